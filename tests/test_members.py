"""trainer.seeds: members trained together, each what a separate run with its seed would be."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import dnnrun
from conftest import make_config, run_cli
from dnnrun.errors import ConfigError, Interrupted, UserError
from dnnrun.insight import report
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import loop as train, members


def test_each_member_follows_the_separate_run_of_its_seed(tmp_path: Path):
    """Without dropout the arithmetic is a single run's: same initialization, shuffle order and
    updates, so each member's epochs match its separate run's (to rounding: batched matmuls), and
    so do its checkpoints (seed 3's best epoch is its second of three)."""
    overrides = [
        "optimizer=adam",
        "optimizer.lr=0.003",
        "trainer.epochs=3",
        "trainer.clip_norm=1.0",
        "regularizer=[l2,max_norm]",
        "norm=batchnorm",
    ]  # each member's running statistics too
    summary = members.run(make_config(*overrides, "trainer.seeds=[3,5]", data="digits"), tmp_path / "together")
    for seed in (3, 5):
        single = train.run(make_config(*overrides, f"trainer.seed={seed}", data="digits"), tmp_path / f"seed{seed}")
        mine = read_jsonl(tmp_path / "together" / "members" / f"seed_{seed}" / "metrics.jsonl")
        theirs = read_jsonl(tmp_path / f"seed{seed}" / "metrics.jsonl")
        for a, b in zip(mine, theirs, strict=True):
            assert a.keys() == b.keys()  # batch norm: train_eval/* too (trainer.eval_train=auto)
            for key in ("train/loss", "val/loss", "val/acc", "train_eval/loss", "train_eval/acc"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (seed, a["epoch"], key)
        member = json.loads((tmp_path / "together" / "members" / f"seed_{seed}" / "summary.json").read_text())
        assert member["test"]["test/acc"] == pytest.approx(single["test"]["test/acc"], abs=1e-9)
        for name in ("best.pt", "last.pt"):  # the best epoch's weights and batch-norm statistics, and the last's
            own = tmp_path / "together" / "members" / f"seed_{seed}" / "checkpoints" / name
            mine = torch.load(own, weights_only=True)["model"]
            theirs = torch.load(tmp_path / f"seed{seed}" / "checkpoints" / name, weights_only=True)["model"]
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert torch.allclose(mine[key].float(), theirs[key].float(), rtol=1e-3, atol=1e-5), (seed, name, key)
    assert summary["aggregate"]["test/acc"]["n"] == 2 and summary["ensemble"]["members"] == 2


def test_with_dropout_members_differ_and_agree_with_separate_runs_within_noise(tmp_path: Path):
    overrides = ["regularizer=[dropout]", "trainer.epochs=4"]
    summary = members.run(make_config(*overrides, "trainer.seeds=[0,1,2]", data="digits"), tmp_path / "together")
    member = tmp_path / "together" / "members"
    accs = [json.loads((member / f"seed_{s}" / "summary.json").read_text())["test"]["test/acc"] for s in (0, 1, 2)]
    singles = [
        train.run(make_config(*overrides, f"trainer.seed={s}", data="digits"), tmp_path / str(s))["test"]["test/acc"]
        for s in (0, 1, 2)
    ]
    assert len(set(accs)) > 1  # their own dropout masks (and initializations)
    assert abs(sum(accs) / 3 - sum(singles) / 3) < 0.05  # the same training, other masks: within noise
    ensemble = summary["ensemble"]["test/acc"]
    assert ensemble >= min(accs) - 0.02 and math.isfinite(summary["ensemble"]["test/loss"])


def test_members_leave_run_directories_the_other_commands_read(tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli(
        "trainer.seeds=[0,1]",
        "trainer.epochs=2",
        "model=cnn",
        "model.channels=[4]",
        "data=digits",
        "regularizer=[dropout]",
        "regularizer.dropout.spatial=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    parent = json.loads((run / "summary.json").read_text())
    assert parent["seeds"] == [0, 1] and set(parent["ensemble"]) == {"members", "test/acc", "test/loss"}
    assert parent["aggregate"]["test/acc"]["std"] is not None
    assert "2 members: trainer.seed=0,1" in (run / "run.log").read_text()
    member = run / "members" / "seed_1"
    assert "train_eval/loss" in read_jsonl(member / "metrics.jsonl")[-1]  # dropout: trainer.eval_train=auto
    model = dnnrun.load(member)  # mode=predict, evaluate, transfer and export read it as a single run's
    assert model.config.trainer.seed == 1 and model.config.trainer.seeds is None
    result = run_cli(
        "mode=evaluate",
        f"evaluate.checkpoint={member / 'checkpoints' / 'best.pt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["deterministic"]["accuracy"]
    assert accuracy == pytest.approx(json.loads((member / "summary.json").read_text())["test"]["test/acc"])


def test_a_diverging_member_stops_and_the_others_go_on(tmp_path: Path, monkeypatch):
    """Seed 1's output layer starts infinite: its first loss is NaN. It is recorded as diverged and
    stops; seed 0 trains on exactly as its separate run (nothing of the NaN reaches it)."""
    from dnnrun.training import runtime

    built = []
    original = runtime.build_model

    def poisoned(cfg, data, model_cfg=None):
        model, reg = original(cfg, data, model_cfg)
        built.append(model)
        if len(built) == 3:  # the second member's model (the first build is the architecture, on meta)
            with torch.no_grad():
                model.output.weight.fill_(float("inf"))
        return model, reg

    monkeypatch.setattr(runtime, "build_model", poisoned)
    summary = members.run(make_config("trainer.seeds=[0,1]", "trainer.epochs=2", data="digits"), tmp_path / "run")
    monkeypatch.setattr(runtime, "build_model", original)
    sick = json.loads((tmp_path / "run" / "members" / "seed_1" / "summary.json").read_text())
    assert sick["status"] == "diverged" and sick["diverged_at_step"] == 1 and sick["test"] is None
    assert sick["diagnosis"][0].startswith("training diverged at step 1: the training loss is nan")
    assert summary["diverged"] == [1] and summary["ensemble"]["members"] == 1
    single = train.run(make_config("trainer.seed=0", "trainer.epochs=2", data="digits"), tmp_path / "single")
    healthy = read_jsonl(tmp_path / "run" / "members" / "seed_0" / "metrics.jsonl")
    alone = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert single["status"] == "completed" and [r["val/loss"] for r in healthy] == pytest.approx(
        [r["val/loss"] for r in alone], rel=1e-4
    )


def test_when_every_member_diverges_the_run_says_so(tmp_path: Path):
    with pytest.raises(UserError, match="every member diverged: training diverged at step"):
        members.run(
            make_config("trainer.seeds=[0,1]", "trainer.epochs=2", "optimizer.lr=1e6", data="digits"), tmp_path / "run"
        )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_a_members_sweep_is_reported_as_mean_and_std_over_the_members(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "act=relu,elu", "trainer.seeds=[0,1,2]", "trainer.epochs=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["act"] for r in rows) == ["elu", "relu"] and all(r["runs"] == "3" for r in rows)


def test_what_members_do_not_support_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as info:
        make_config("trainer.seeds=[0,1]", "pretrain=rotation", "trainer.compile=true", data="digits")
    assert info.value.problems == [
        "pretrain: trainer.seeds (members trained together) does not support pretraining yet; or train the seeds as "
        "separate runs: -m trainer.seed=0,1",
        "trainer.compile: trainer.seeds (members trained together) does not support torch.compile yet; or train the "
        "seeds as separate runs: -m trainer.seed=0,1",
    ]
    with pytest.raises(ConfigError, match="trainer.seeds: must list two or more distinct seeds"):
        make_config("trainer.seeds=[1,1]")


def _members_state(run: Path, seeds=(0, 1)) -> tuple[list, list]:
    weights = [
        torch.load(run / "members" / f"seed_{s}" / "checkpoints" / "last.pt", weights_only=True)["model"] for s in seeds
    ]
    metrics = [
        [
            {k: v for k, v in r.items() if not k.startswith("time/")}
            for r in read_jsonl(run / "members" / f"seed_{s}" / "metrics.jsonl")
        ]
        for s in seeds
    ]
    return weights, metrics


def _same(a: Path, b: Path) -> bool:
    (wa, ma), (wb, mb) = _members_state(a), _members_state(b)
    return ma == mb and all(torch.equal(x[n], y[n]) for x, y in zip(wa, wb) for n in x)


def test_members_stopped_mid_epoch_or_by_sigterm_resume_to_the_same_members(tmp_path: Path, monkeypatch):
    """A crash in the second epoch (as kill -9 leaves the files: the first epoch's checkpoint, the
    second half done), then trainer.resume=auto: bit-identical members, dropout masks and shuffles
    included (the random streams are in the checkpoint). The same after SIGTERM in the second
    epoch: the step under way ends, the process stops with the signal, the resume redoes the epoch."""
    args = ["trainer.seeds=[0,1]", "trainer.epochs=3", "trainer.batch_size=16", "regularizer=[dropout]"]
    members.run(make_config(*args, data="digits"), tmp_path / "straight")
    vmap, made = torch.func.vmap, []

    def crashing_vmap(function, *a, **kw):
        batched = vmap(function, *a, **kw)
        made.append(batched)
        if len(made) > 1:  # the evaluation pass
            return batched
        calls = []

        def train_forward(*inputs):
            calls.append(1)
            if len(calls) == crash_at:
                raise RuntimeError("killed")
            return batched(*inputs)

        return train_forward

    crash_at = members.steps_per_epoch(make_config(*args, data="digits"), 1294) + 20  # in the second epoch
    monkeypatch.setattr(torch.func, "vmap", crashing_vmap)
    with pytest.raises(RuntimeError, match="killed"):
        members.run(make_config(*args, data="digits"), tmp_path / "killed")
    monkeypatch.setattr(torch.func, "vmap", vmap)
    assert len(read_jsonl(tmp_path / "killed" / "members" / "seed_0" / "metrics.jsonl")) == 1
    members.run(make_config(*args, "trainer.resume=auto", data="digits"), tmp_path / "killed")
    assert _same(tmp_path / "killed", tmp_path / "straight")
    with pytest.raises(UserError, match="already holds a checkpoint"):  # without trainer.resume: never overwritten
        members.run(make_config(*args, data="digits"), tmp_path / "killed")

    def terminating_vmap(function, *a, **kw):  # SIGTERM arrives during a step of the second epoch
        batched = vmap(function, *a, **kw)
        calls = []

        def forward(*inputs):
            calls.append(1)
            if len(calls) == crash_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return batched(*inputs)

        return forward

    monkeypatch.setattr(torch.func, "vmap", terminating_vmap)
    with pytest.raises(Interrupted) as stopped:
        members.run(make_config(*args, data="digits"), tmp_path / "stopped")
    monkeypatch.setattr(torch.func, "vmap", vmap)
    assert stopped.value.signum == signal.SIGTERM and (tmp_path / "stopped" / "checkpoints" / "last.pt").exists()
    members.run(make_config(*args, "trainer.resume=auto", data="digits"), tmp_path / "stopped")
    assert _same(tmp_path / "stopped", tmp_path / "straight")


def test_performance_scheduling_cuts_each_members_rate_on_its_own_plateaus(tmp_path: Path):
    overrides = [
        "optimizer=momentum",
        "optimizer.lr=0.05",
        "schedule=performance",
        "schedule.patience=1",
        "schedule.factor=0.3",
        "schedule.min_delta=0.1",
        "trainer.epochs=5",
    ]  # gains under 0.1: plateaus
    members.run(make_config(*overrides, "trainer.seeds=[0,1]", data="digits"), tmp_path / "together")
    rates = set()
    for seed in (0, 1):
        train.run(make_config(*overrides, f"trainer.seed={seed}", data="digits"), tmp_path / str(seed))
        mine = read_jsonl(tmp_path / "together" / "members" / f"seed_{seed}" / "metrics.jsonl")
        theirs = read_jsonl(tmp_path / str(seed) / "metrics.jsonl")
        assert [r["lr"] for r in mine] == pytest.approx([r["lr"] for r in theirs])
        # each update scaled, not computed at the rate: equal to rounding
        assert [r["val/loss"] for r in mine] == pytest.approx([r["val/loss"] for r in theirs], rel=1e-4)
        rates.add(tuple(r["lr"] for r in mine))
    assert any(len(set(r)) > 1 for r in rates)  # the rate was cut
