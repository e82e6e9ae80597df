"""What a stage calls before it trains (reweight; select, compare and group alike): the data checks with the
recipe's settings, the main process first (it logs and fills the cache), then the others, silently, from the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scalebio_cli.data.checks import DataChecks, check_sources
from scalebio_cli.data.checks_report import Draws, print_report, reweight_draws
from scalebio_cli.data.read.sources import DataSource


def before_training(recipe: Any, sources: dict[str, DataSource], references: dict[str, DataSource], *,
                    draws: Draws | None = None, fingerprints: dict[str, str] | None = None, is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None, keeps_all: str | None = None) -> DataChecks:
    """What a stage calls before it trains (reweight; select, compare, group alike): `check_sources` with the
    recipe's `data.decontaminate` and cache, the main process first (it logs and fills the cache), then the others,
    silently, from the cache. `references`: the validation sets and any test files, by the label the log gives
    them (e.g. `data.validation`, `test set 'gsm8k'`). `keeps_all`: the name of a stage that drops nothing
    (select, compare, group): `data.decontaminate` is reweight's, so the log tells to remove the copies instead."""
    result: DataChecks | None = None
    decontaminate = recipe.data.decontaminate and keeps_all is None
    for main_turn in (True, False):
        if main_turn == is_main:
            result = check_sources(sources, references, decontaminate=decontaminate, draws=draws,
                                   cache_dir=recipe.data.cache_dir, fingerprints=fingerprints,
                                   report=print_report if is_main else None, keeps_all=keeps_all)
        barrier()
    assert result is not None
    return result


def for_reweight(recipe: Any, data: Any, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> DataChecks:
    """reweight's checks (`data`: stages/reweight.RunData): its sources against its validation sets, with the
    draws of its steps and batches."""
    cfg = recipe.reweight
    draws = reweight_draws(cfg.steps, cfg.batch_size, cfg.batch_composition,
                           {n: d.num_records for n, d in zip(data.sources, data.source_data)})
    fingerprints = {s.key: d.sha256 for s, d in zip(data.sources.values(), data.source_data)}
    return before_training(recipe, data.sources, {s.key: s for s in data.vals.values()}, draws=draws,
                           fingerprints=fingerprints, is_main=is_main, barrier=barrier)
