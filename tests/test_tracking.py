"""Recipe key `report_to`: every metrics line also reaches TensorBoard / W&B, and the recipe refuses unknown names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scalebio_cli.errors import InputError
from scalebio_cli.recipe import load_recipe
from scalebio_cli.results.tracking import Trackers, scalars


def test_reweight_tensorboard_events_hold_every_source_weight(reweighted: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((reweighted / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(reweighted / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    metrics = [json.loads(line) for line in (reweighted / "metrics.jsonl").read_text().splitlines()]
    names = list(metrics[-1]["weights"])
    assert {f"weights/{n}" for n in names} | {f"loss_u/{n}" for n in names} | {"L1", "L2_u", "lr_lambda"} <= tags
    for name in names:
        points = acc.Scalars(f"weights/{name}")
        assert [p.step for p in points] == [m["step"] for m in metrics]
        assert points[-1].value == pytest.approx(metrics[-1]["weights"][name], abs=1e-6)


def test_scalars_flatten_numbers_and_per_source_mappings() -> None:
    record = {"step": 3, "L1": 1.5, "weights": {"a": 0.25, "b": 0.75}, "active_blocks": [1, 2], "grad_norm_u": None,
              "flag": True}
    assert scalars(record) == {"L1": 1.5, "weights/a": 0.25, "weights/b": 0.75}


def test_wandb_offline_run_is_written_under_the_output_dir(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path, 0, {"seed": 0})
    trackers.log({"step": 10, "L1": 1.0, "weights": {"a": 0.4, "b": 0.6}})
    trackers.trackers[0]._finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "wandb_id").read_text().strip() in runs[0].name


def test_report_to_is_checked(tmp_path: Path) -> None:
    def recipe(value: object) -> Path:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": "m", "output_dir": "o", "report_to": value}))
        return path

    assert load_recipe(recipe(["tensorboard", "wandb"])).report_to == ["tensorboard", "wandb"]
    assert load_recipe(recipe("tensorboard")).report_to == ["tensorboard"]  # one name needs no list
    assert load_recipe(recipe([])).report_to == []
    with pytest.raises(InputError, match=r"report_to: unknown tracker 'mlflow' \(use tensorboard and/or wandb\)"):
        load_recipe(recipe(["mlflow"]))
    with pytest.raises(InputError, match="report_to: expected a list"):
        load_recipe(recipe({"a": 1}))


def test_losses_per_source_and_per_set_take_the_train_and_val_names() -> None:
    """finetune's `train_loss_by_source` and `val_loss` mappings (and reweight's `val_loss/NAME`) reach the trackers
    as `train/loss/SOURCE` and `val/loss/NAME`, one chart each; other keys keep their names."""
    seen: list[tuple[int, dict[str, float], dict[str, list[str]]]] = []

    class Capture:
        def log(self, step: int, values: dict[str, float], groups: dict[str, list[str]]) -> None:
            seen.append((step, values, groups))

    trackers = Trackers([], Path("."))
    trackers.trackers.append(Capture())
    trackers.log({"step": 4, "loss": 2.0, "train_loss_by_source": {"a": 1.5, "b": 2.5},
                  "val_loss": {"gsm": 1.0, "chat": 3.0}, "weights": {"a": 0.5}})
    trackers.log({"step": 5, "val_loss": 1.25, "val_loss/math": 0.5})
    (step, values, groups), (_, second, _) = seen
    assert step == 4 and values == {"loss": 2.0, "train/loss/a": 1.5, "train/loss/b": 2.5, "val/loss/gsm": 1.0,
                                    "val/loss/chat": 3.0, "weights/a": 0.5}
    assert groups == {"train/loss": ["a", "b"], "val/loss": ["gsm", "chat"], "weights": ["a"]}
    assert second == {"val_loss": 1.25, "val/loss/math": 0.5}  # one unnamed set keeps its plain name
