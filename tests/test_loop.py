"""The loop where the device runs ahead of the host (CUDA): no read of the loss a step. Emulated
on the CPU by taking it off the devices read each step (engine.READ_EACH_STEP): the engines then
leave every loss on the device, and the loop reads them every CHECK_EVERY steps and before any
checkpoint. A divergence is still named at its step, and nothing non-finite reaches a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config
from dnnrun.errors import Diverged
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import engine, faults, loop

SETUP = ("trainer.epochs=2", "model.hidden=[32]", "optimizer=adam", "trainer.clip_norm=1.0")  # 27 steps an epoch


@pytest.fixture
def runs_ahead(monkeypatch):
    """The CPU as a device that runs ahead: reads every 4 steps, counted."""
    monkeypatch.setattr(engine, "READ_EACH_STEP", ())
    monkeypatch.setattr(loop, "CHECK_EVERY", 4)
    reads = []
    check = loop.Tally.check

    def counted(self):
        reads.append(len(self._pending))
        return check(self)

    monkeypatch.setattr(loop.Tally, "check", counted)
    return reads


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run / "metrics.jsonl")]


def test_the_same_run_when_the_losses_are_read_every_n_steps(tmp_path: Path, runs_ahead):
    loop.run(make_config(*SETUP), tmp_path / "ahead")
    assert runs_ahead and max(runs_ahead) <= 4 and len(runs_ahead) == 2 * (27 // 4 + 1)  # never a read a step
    engine.READ_EACH_STEP = ("cpu",)  # monkeypatch restores it: the eager run for comparison
    loop.run(make_config(*SETUP), tmp_path / "each")
    assert _records(tmp_path / "ahead") == _records(tmp_path / "each")


def test_a_divergence_seen_late_is_named_at_its_step_and_never_saved(tmp_path: Path, runs_ahead):
    with pytest.raises(Diverged) as info:
        loop.run(make_config(*SETUP), tmp_path / "run", hook=faults.parse("nan@step=30"))  # epoch 2, read at 32
    assert info.value.step == 30 and "the training loss is nan" in str(info.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 30 and summary["epochs_run"] == 1
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["trainer"]["epoch"] == 1  # epoch 1's, untouched
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_member_diverging_late_goes_back_to_its_last_checkpoint(tmp_path: Path, runs_ahead):
    """Seed 1's weights become infinite in epoch 2 (after step 30), read at step 32: it is retired
    with the weights of epoch 1's checkpoint; its optimizer state is made finite; seed 0 goes on as
    its separate run."""
    seeds = ["trainer.seeds=[0,1]"]

    class Poison(faults.Hook):
        def __init__(self):
            self.loop = None

        def train_start(self, run):
            self.loop = run

        def after_step(self, step: int) -> None:
            if step == 30:
                with torch.no_grad():
                    self.loop.engine.params["output.weight"][1] = float("inf")

    loop.run(make_config(*SETUP, *seeds), tmp_path / "run", hook=Poison())
    sick = json.loads((tmp_path / "run" / "members" / "seed_1" / "summary.json").read_text())
    assert sick["status"] == "diverged" and sick["diverged_at_step"] == 31 and sick["epochs_run"] == 1
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    tensors = [*saved["model"].values(), *(t for s in saved["optimizer"]["state"].values() for t in s.values())]
    assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor))
    own = torch.load(tmp_path / "run" / "members" / "seed_1" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in own["model"].values())
    engine.READ_EACH_STEP = ("cpu",)
    loop.run(make_config(*SETUP, "trainer.seed=0"), tmp_path / "single")
    mine, theirs = _records(tmp_path / "run" / "members" / "seed_0"), _records(tmp_path / "single")
    assert [r["epoch"] for r in mine] == [1, 2]
    for a, b in zip(mine, theirs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
