"""`scalebio group`: groups within sources (CONTRACT v4; ALGORITHM.md, "Groups within a source").

Every kept record of data.sources gets features from the model (grouping/features.py: mean-pooled last hidden
states over prompt and response, and the response's loss), the features are clustered (grouping/clustering.py:
k-means, k by the silhouette score), and each record is written unchanged plus `"group": "SOURCE/gNN"`
(grouping/output.py) with OUT.manifest.json: the settings, k and the score of each k tried, each group's size and
share of its source, each cluster's share of every source, and example records per group (the records nearest
their cluster's centre). A recipe then reads OUT as `data.sources.NAME: {path: OUT, split_by: group}`, and
reweight, sample, export, compare and report treat every group as a source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.errors import InputError
from scalebio_cli.recipe import Recipe


def parse_k(value: str, key: str) -> int | None:
    """`auto` -> None, else a whole number >= 2 (InputError naming `key` otherwise)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 2:
        return int(text)
    raise InputError(f"{key}: must be auto or a whole number of groups >= 2, got {value!r}")


def _settings_problems(recipe: Recipe) -> list[str]:
    g = recipe.group
    problems = []
    try:
        parse_k(g.k, "group.k")
    except InputError as exc:
        problems += exc.problems
    if not g.k_sweep or any(k < 2 for k in g.k_sweep):
        problems.append(f"group.k_sweep: needs numbers of groups >= 2 (e.g. [2, 4, 8]), got {g.k_sweep}")
    return problems


def _group_column_problems(sources: dict[str, Any]) -> list[str]:
    """A source whose records already carry a `group` column (the output would overwrite it)."""
    from scalebio_cli.data.read import sources as data_sources

    problems = []
    for source in sources.values():
        try:
            columns = data_sources.open_table(source).column_names()
        except InputError:
            continue  # reported by the source checks
        if "group" in columns:
            problems.append(f"{source.key}: {source.path} already has a 'group' column, which the output would "
                            "overwrite; rename it (or group the records without it), or write --format messages")
    return problems


def check(recipe: Recipe, where: str | Path, k: str | None, output: Path, fmt: str, force: bool) -> None:
    """Every problem of the inputs at once (exit 2), before torch loads: --k and the recipe's group section, the
    sources (each record parsed), the model folder, and the output."""
    from scalebio_cli.data.out.record_writer import output_problems
    from scalebio_cli.recipe.model_checks import model_folder_problems
    from scalebio_cli.recipe.preflight import model_files, output_file_problems, recipe_source_problems

    usage = []
    if k is not None:
        try:
            parse_k(k, "--k")
        except InputError as exc:
            usage += exc.problems
    usage += output_problems(output, fmt, force)
    manifest = output.with_name(output.stem + ".manifest.json")
    problems = _settings_problems(recipe)
    if not recipe.data.sources:
        problems.append("data.sources: group needs the sources whose records it groups")
    sources, data_problems = recipe_source_problems(recipe, validation=False)
    problems += data_problems + (_group_column_problems(sources) if fmt == "original" else [])
    model = recipe.group.model or recipe.model
    own_tokenizer = bool(recipe.tokenizer) and not recipe.group.model
    problems += model_folder_problems("group.model" if recipe.group.model else "model", model,
                                      need_tokenizer=not own_tokenizer)
    if own_tokenizer:
        problems += model_folder_problems("tokenizer", recipe.tokenizer or "", need_weights=False)
    inputs = {s.key: s.path for s in sources.values()} | model_files(model)
    usage += output_file_problems("--output", output, inputs)
    usage += output_file_problems("--output (its manifest)", manifest, inputs)
    if usage or problems:
        raise InputError(usage + [f"{where}: {p}" for p in problems])


def feature_recipe(recipe: Recipe) -> Recipe:
    """The recipe the features are computed with: group.model (with its own tokenizer) in place of `model` when
    set; no validation sets (group does not read them)."""
    data = dataclasses.replace(recipe.data, validation=None)
    if recipe.group.model:
        return dataclasses.replace(recipe, model=recipe.group.model, tokenizer=None, data=data)
    return dataclasses.replace(recipe, data=data)


def _feature_key(recipe: Recipe, pool: Any, dtype: Any) -> dict[str, Any]:
    """Everything the features depend on (the cache key, results/reuse.py): the sources and the model by content,
    and the settings."""
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.data.tokens.tokenized import tokenizer_fingerprint
    from scalebio_cli.grouping import features
    from scalebio_cli.results import reuse

    sources = recipe_sources(recipe)
    inputs = {f"source {n}": data_sources.content_key(sources[n], d.sha256) for n, d in pool.sources.items()}
    inputs |= {f"the {k}": v for k, v in reuse.model_identity(recipe.model, recipe.tokenizer).items()}
    return reuse.make_key(inputs, {"tokenizer": tokenizer_fingerprint(pool.tokenizer),
                                   "max_length": recipe.data.max_length, "dtype": str(dtype),
                                   "micro_batch_size": recipe.group.micro_batch_size, "chunk": features.CHUNK,
                                   "version": features.FEATURE_VERSION})


def _features(recipe: Recipe, dist: Any) -> tuple[Any, Any, Path]:
    """(pool, features on the main process or None, cache folder): computed in batches with a progress bar,
    resumed from the cache."""
    from rich.markup import escape

    from scalebio_cli.console import console, step_progress
    from scalebio_cli.grouping import features
    from scalebio_cli.selection.pool import load_pool
    from scalebio_cli.train.modeling import load_model, resolve_dtype

    pool = load_pool(recipe, dist)
    datas = list(pool.sources.values())
    dtype = resolve_dtype(recipe.precision, dist.device)
    folder = features.cache_folder(_feature_key(recipe, pool, dtype), recipe.data.cache_dir)
    if dist.is_main:
        console.print(f"[dim]group[/] features of {pool.size:,} records from {escape(recipe.model)} (mean-pooled "
                      f"last hidden states + response loss); cache {escape(str(folder))}")
    model = load_model(recipe.model, dtype, dist.device, recipe.trust_remote_code)
    model.eval()
    items = features.items_of(datas)
    progress = step_progress("features", dist.is_main)
    task = progress.add_task("features", total=len(range(dist.rank, -(-len(items) // features.CHUNK),
                                                         dist.world_size)), info="chunks of "
                             f"{features.CHUNK} records")
    mb = recipe.group.micro_batch_size

    def run(chunk: list[features.Item]) -> dict[str, np.ndarray]:
        return features.chunk_features(model, datas, chunk, mb, pool.pad_id, dist.device)

    with progress:
        found = features.compute(folder, items, dist, run, lambda n: progress.advance(task, 1))
    return pool, found, folder


def evidence_note(num_groups: int, recipe: Recipe) -> str:
    """What K groups mean for reweight's evidence with this recipe's batch, steps and lambda_every."""
    rw = recipe.reweight
    per_step = rw.batch_size / max(num_groups, 1)
    lam_steps = max(0, rw.steps - rw.delay) // max(rw.lambda_every, 1)
    return (f"{num_groups} groups: with reweight.batch_size={rw.batch_size} a group gets {per_step:.1f} examples a "
            f"step, {per_step * rw.lambda_every:.1f} per lam step (reweight.lambda_every={rw.lambda_every}); "
            f"reweight.steps={rw.steps} make {lam_steps} lam steps, {per_step * rw.steps:,.0f} examples per group. "
            f"A group's evidence is as noisy as sqrt(K / (batch_size x lambda_every x lam steps)): to tell groups "
            f"apart as surely as a two-source run tells its sources, multiply batch_size, lambda_every or the steps "
            f"by ~{max(num_groups / 2, 1):.1f}")


def _examples(x: np.ndarray, labels: np.ndarray, centroid: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """The `count` rows (of `rows`, all in one group) nearest the group's cluster centre: its typical records."""
    if not count or not len(rows):
        return rows[:0]
    distance = ((x[rows] - centroid) ** 2).sum(axis=1)
    return rows[np.argsort(distance, kind="stable")[:count]]


def _groups(recipe: Recipe, pool: Any, feats: Any, x: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
            record_labels: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The manifest's `groups`: per SOURCE/gNN its size, share of its source, mean response loss, examples."""
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.grouping.output import example_records, group_name

    sources = recipe_sources(recipe)
    out: dict[str, dict[str, Any]] = {}
    for s, (name, data) in enumerate(pool.sources.items()):
        mine = np.flatnonzero(feats.source == s)
        every = record_labels[name]
        for c in np.unique(every):
            rows = mine[labels[mine] == c]
            picks = _examples(x, labels, centroids[c], rows, recipe.group.examples)
            positions = [int(data.record_index[feats.example[r]]) for r in picks]
            found = example_records(sources[name], positions) if positions else {}
            out[group_name(name, int(c))] = {
                "source": name, "cluster": f"g{int(c):02d}", "size": int((every == c).sum()),
                "share_of_source": float((every == c).mean()),
                "mean_loss": float(feats.loss[rows].mean()) if len(rows) else None,
                "examples": [{"record": p, "data": found[p]} for p in positions]}
    return out


def _clusters(groups: dict[str, dict[str, Any]], sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The manifest's `clusters`: per cluster (the same gNN across sources) its size and share of each source."""
    out: dict[str, dict[str, Any]] = {}
    for info in groups.values():
        entry = out.setdefault(info["cluster"], {"size": 0, "share_of_source": {}, "sources": {}})
        entry["size"] += info["size"]
        entry["sources"][info["source"]] = info["size"]
        entry["share_of_source"][info["source"]] = info["size"] / sizes[info["source"]]
    for entry in out.values():
        entry["composition"] = {n: c / entry["size"] for n, c in entry["sources"].items()}
    return dict(sorted(out.items()))


def _cluster(recipe: Recipe, k: int | None, feats: Any, names: list[str]) -> tuple[Any, np.ndarray, np.ndarray,
                                                                                     list[dict[str, Any]], int]:
    """(clustering, feature matrix, labels after merging, merges, min_size)."""
    from scalebio_cli.grouping import clustering

    g = recipe.group
    x = clustering.feature_matrix(feats.hidden, feats.loss, g.loss_weight, g.prompt_weight, g.pca_dims,
                                  recipe.seed)
    found = clustering.choose(x, feats.loss, k, g.k_sweep, g.silhouette_sample, recipe.seed)
    min_size = g.min_size or recipe.reweight.batch_size
    if g.small == "refuse":
        clustering.refuse_small(found.labels, feats.source, names, min_size)
        return found, x, found.labels, [], min_size
    labels, merges = clustering.merge_small(found.labels, feats.source, found.centroids, min_size)
    named = [{**m, "source": names[m["source"]], "from": f"g{m['from']:02d}", "into": f"g{m['into']:02d}"}
             for m in merges]
    return found, x, labels, named, min_size


def _data_checks(recipe: Recipe, dist: Any) -> None:
    """The data checks every stage runs first (data/checks.py): duplicates, records shared between sources, copies
    of validation records, in the log. group writes every record whatever they find (reweight drops leaks later,
    with data.decontaminate: true)."""
    from scalebio_cli.data import stage_checks
    from scalebio_cli.data.read.expand import recipe_sources, validation_sources
    from scalebio_cli.train import distributed

    references = {s.key: s for s in validation_sources(recipe).values()}
    stage_checks.before_training(recipe, recipe_sources(recipe), references,
                                 is_main=dist.is_main, barrier=lambda: distributed.barrier(dist), keeps_all="group")


def run(recipe: Recipe, k_option: str | None, output: Path, fmt: str) -> dict[str, Any] | None:
    """Features, clusters, OUT and OUT.manifest.json; returns the manifest (None on processes other than the main
    one, which only compute their share of the features)."""
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.files import write_json
    from scalebio_cli.grouping.output import record_labels, write_grouped
    from scalebio_cli.train import distributed

    dist = distributed.setup()
    _data_checks(recipe, dist)
    pool, feats, folder = _features(feature_recipe(recipe), dist)
    if not dist.is_main:
        distributed.teardown()
        return None
    k = parse_k(k_option if k_option is not None else recipe.group.k, "--k" if k_option is not None else "group.k")
    names = list(pool.sources)
    found, x, labels, merges, min_size = _cluster(recipe, k, feats, names)
    every, skipped = {}, {}
    for s, (name, data) in enumerate(pool.sources.items()):
        every[name], skipped[name] = record_labels(labels[feats.source == s], data.record_index, data.num_records)
    write_grouped(recipe_sources(recipe), every, output, fmt)
    groups = _groups(recipe, pool, feats, x, labels, found.centroids, every)
    g = recipe.group
    manifest = {"format": "scalebio-groups/1", "output": str(output), "format_of_records": fmt,
                "num_records": int(sum(len(v) for v in every.values())), "k": found.k,
                "k_chosen_by": "silhouette" if k is None else "given",
                "k_scores": {str(kk): v for kk, v in found.scores.items()}, "num_groups": len(groups),
                "settings": {**dataclasses.asdict(g), "min_size": min_size, "model": recipe.group.model or recipe.model,
                             "seed": recipe.seed, "max_length": recipe.data.max_length},
                "features": {"what": "mean-pooled last hidden states over prompt and response, and the response's "
                             "mean token loss (standardised, weighted by group.loss_weight)", "cache": str(folder)},
                "sources": {n: {"records": len(every[n]), "skipped": skipped[n]} for n in names},
                "merges": merges, "evidence": evidence_note(len(groups), recipe),
                "clusters": _clusters(groups, {n: len(every[n]) for n in names}), "groups": groups,
                "use": f"data.sources.NAME: {{path: {output}, split_by: group}}"}
    write_json(output.with_name(output.stem + ".manifest.json"), manifest)
    _log(manifest, output)
    distributed.teardown()
    return manifest


def _log(manifest: dict[str, Any], output: Path) -> None:
    from rich.markup import escape

    from scalebio_cli.console import console

    if manifest["k_scores"]:
        scores = ", ".join(f"k={k} {v:.3f}" for k, v in manifest["k_scores"].items())
        console.print(f"[dim]group[/] silhouette: {scores} -> k={manifest['k']}")
    for merge in manifest["merges"]:
        console.print(f"[dim]group[/] {escape(merge['source'])}/{merge['from']}: {merge['records']:,} record(s), fewer "
                      f"than group.min_size={manifest['settings']['min_size']}: merged into {merge['into']}")
    for name, info in manifest["groups"].items():
        loss = "-" if info["mean_loss"] is None else f"{info['mean_loss']:.3f}"
        console.print(f"  {escape(name)}: {info['size']:,} records ({info['share_of_source']:.0%} of "
                      f"{escape(info['source'])}), mean response loss {loss}")
    for name, count in ((n, s["skipped"]) for n, s in manifest["sources"].items() if s["skipped"]):
        console.print(f"[yellow]note:[/] {escape(name)}: {count:,} records keep no response token within "
                      "data.max_length; they join their source's largest group (reweight skips them too)")
    console.print(f"[dim]group[/] {escape(manifest['evidence'])}")
    console.print(f"[bold green]grouped[/] {manifest['num_records']:,} records into {manifest['num_groups']} groups "
                  f"-> {escape(str(output))}; use it as {escape(manifest['use'])}")
