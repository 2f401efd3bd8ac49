"""logger=tensorboard's hparams: every run's options and key values with its final, best and test
metrics, in the run's own TensorBoard folder, for the HParams tab to compare the runs of a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_config
from dnnrun.insight import loggers
from dnnrun.training import loop


def test_a_run_writes_its_options_values_and_metrics_as_hparams_beside_its_scalars(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    summary = loop.run(
        make_config(
            "logger=tensorboard", "trainer.epochs=2", "optimizer.lr=0.03", "regularizer=[l2]", "trainer.monitor=val/acc"
        ),
        tmp_path,
    )
    folder = tmp_path / "tensorboard"
    assert [p for p in folder.iterdir() if p.is_dir()] == []  # no timestamped sub-run: one run in TensorBoard
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    plugin = events.PluginTagToContent("hparams")

    chosen = metadata.parse_session_start_info_plugin_data(plugin["_hparams_/session_start_info"]).hparams
    strings = {k: v.string_value for k, v in chosen.items() if v.WhichOneof("kind") == "string_value"}
    numbers = {k: v.number_value for k, v in chosen.items() if v.WhichOneof("kind") == "number_value"}
    assert strings["init"] == "he_normal" and strings["data"] == "synthetic" and strings["optimizer"] == "sgd"
    assert strings["regularizer"] == "[l2]" and strings["model.hidden"] == "[300, 100]"
    assert numbers["optimizer.lr"] == pytest.approx(0.03)
    assert numbers["trainer.epochs"] == 2 and numbers["trainer.batch_size"] == 32 and numbers["trainer.seed"] == 0
    assert "trainer.clip_norm" not in chosen  # None is left out

    experiment = metadata.parse_experiment_plugin_data(plugin["_hparams_/experiment"])
    expected = {
        "hparams/best/val/acc": summary["best"]["value"],
        "hparams/best/epoch": summary["best"]["epoch"],
        "hparams/test/acc": summary["test"]["test/acc"],
        "hparams/test/loss": summary["test"]["test/loss"],
        **{f"hparams/final/{k}": summary["final"][k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")},
    }
    assert {m.name.tag for m in experiment.metric_infos} == set(expected)
    for tag, value in expected.items():  # the HParams tab reads each metric's last scalar
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(summary["steps"], pytest.approx(value))], tag
    # the epoch metrics' curves keep their own points: add_hparams adds none to them
    assert len(events.Scalars("test/acc")) == 1 and len(events.Scalars("val/acc")) == 2


def test_hparams_are_plain_values_and_a_run_without_a_test_pass_has_fewer_metrics():
    values = loggers.hparams(make_config("trainer.clip_norm=1.0", "regularizer=[l2,dropout]"))
    assert all(isinstance(v, (int, float, str, bool)) for v in values.values())
    assert values["trainer.clip_norm"] == 1.0 and values["regularizer"] == "[l2,dropout]"
    assert values["regularizer.dropout.rate"] == 0.2 and "trainer.clip_value" not in values
    diverged = {"best": {"monitor": "val/loss", "value": float("inf")}, "final": {}, "test": None}
    assert loggers.summary_metrics(diverged) == {}
