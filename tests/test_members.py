"""trainer.seeds: members trained together through the same loop as a single run, each what a
separate run with its seed would be; what members do not support is refused with the reason."""

from __future__ import annotations

import copy
import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch

import dnnrun
from conftest import COMPANIONS, compose_raw, make_config, run_cli, write_cifar_like, write_mnist_like
from dnnrun.cli import CONFIG_DIR
from dnnrun.config.run_config import RunConfig, parse_run_config
from dnnrun.errors import ConfigError, Diverged, Interrupted, UserError
from dnnrun.insight import report
from dnnrun.optim import optimizers
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import faults, loop

SEEDS = (3, 5)
SMALL = ["model.hidden=[16]", "trainer.epochs=2", "trainer.batch_size=64", "trainer.limit_batches=3"]

# Every option of every group is compared with separate runs, run as random (each member its own
# draws), or refused. Options that need data files get tiny ones (the `files` fixture).
GROUPS = [
    "data",
    "model",
    "init",
    "act",
    "norm",
    "optimizer",
    "schedule",
    "regularizer",
    "pretrain",
    "logger",
    "trainer",
]
STOCHASTIC = {  # random in training: each member draws its own, as a separate run of its seed would not
    "regularizer=dropout": "random masks",
    "regularizer=alpha_dropout": "random masks",
}
REFUSED = {  # the config, and what the refusal must say (the engine's or the registry's declared reason)
    "act=rrelu": "does not support act=rrelu: torch.func.vmap does not batch its random slopes",
    "model=zoo": "does not support model=zoo: a zoo network starts from model.weights",
    "pretrain=autoencoder": "does not support pretraining: pretraining fits one model's layers one by one",
    "pretrain=corrupted": "does not support pretraining",
    "pretrain=rbm": "does not support pretraining",
    "pretrain=rotation": "does not support pretraining",
    "transfer.source=x.pt": "does not support transfer: transfer copies a source's weights into one model",
    "trainer.compile=true": "does not support torch.compile: torch.compile does not trace the vmapped forward",
    "trainer.channels_last=true": "does not support channels-last: the members' batches are 5-D",
    "trainer.diagnostics.every=10": "does not support per-layer statistics: the per-layer statistics hook",
    "mode=evaluate": "does not support mode=evaluate",
}
# Settings beyond the groups' options, compared too (the loop's features, each for both engines)
SETTINGS = [
    "trainer.clip_norm=0.5",
    "trainer.clip_value=0.05",
    "trainer.early_stopping.patience=1 trainer.epochs=4",
    "trainer.eval_train=true",
    "trainer.restore_best=false",
    "trainer.monitor=val/acc",
    "trainer.amp=true",  # CPU: float32 with a warning, as for a single run
    "data.augment=[flip,crop] data=digits model=cnn model.channels=[4]",
    "schedule=performance schedule.patience=1 schedule.min_delta=0.5 trainer.epochs=4",
]


def _options(group: str) -> list[str]:
    return [f"{group}={p.stem}" for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]


COMPARED = [o for g in GROUPS for o in _options(g) if o not in STOCHASTIC and o not in REFUSED] + SETTINGS


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny dataset files in torchvision's layouts (the data group's options that read files)."""
    root = tmp_path_factory.mktemp("data")
    write_mnist_like(root / "MNIST" / "raw", n_train=160)
    write_mnist_like(root / "FashionMNIST" / "raw", n_train=160)
    write_cifar_like(root, per_batch=32)
    return root


def _overrides(case: str, files: Path) -> tuple[list[str], str]:
    """The case's overrides with what it needs (COMPANIONS), and its data."""
    items = case.split()
    data = next((i.removeprefix("data=") for i in items if i.startswith("data=")), "synthetic")
    items = [i if not i.startswith("regularizer=") else f"regularizer=[{i.split('=')[1]}]" for i in items]
    items = [i for i in items if not i.startswith("data=")]
    for item in case.split():
        items += [c for c in COMPANIONS.get(item, []) if not c.startswith("data=")]
        data = next((c.removeprefix("data=") for c in COMPANIONS.get(item, []) if c.startswith("data=")), data)
    if data in ("mnist", "fashion_mnist", "cifar10"):
        items += [f"data.root={files}", "data.download=false", "data.val_size=16"]
    small = [s for s in SMALL if not (s.startswith("model.") and any(i.startswith("model=") for i in items))]
    return [*small, *items], data


def _configs(overrides: list[str], data: str) -> tuple[RunConfig, dict[int, RunConfig]]:
    """The members' config and each seed's single run's, composed once."""
    raw = compose_raw(f"data={data}", "trainer.progress=false", "trainer.diagnostics.plots=false", *overrides)
    configs = {}
    for seeds, seed in ((list(SEEDS), 0), *((None, s) for s in SEEDS)):
        variant = copy.deepcopy(raw)
        variant["trainer"].update(seeds=seeds, seed=seed)
        configs[seed] = parse_run_config(variant)
    return configs.pop(0), configs


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run / "metrics.jsonl")]


def _same_records(mine: list[dict], theirs: list[dict], case: str) -> None:
    assert len(mine) == len(theirs) > 0, case
    for a, b in zip(mine, theirs):
        assert a.keys() == b.keys(), case
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (case, a["epoch"], key)


def _same_weights(a: Path, b: Path, case: str) -> None:
    mine, theirs = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert mine.keys() == theirs.keys(), case
    for key in mine:
        assert torch.allclose(mine[key].float(), theirs[key].float(), rtol=1e-3, atol=1e-5), (case, key)


@pytest.mark.parametrize("case", COMPARED)
def test_each_member_is_its_separate_run(case, files, tmp_path: Path, cifar_files_accepted):
    """K = 2 members against two separate runs: the whole metrics.jsonl records (times aside, lr
    included) and the checkpoints' weights."""
    overrides, data = _overrides(case, files)
    together, singles = _configs(overrides, data)
    summary = loop.run(together, tmp_path / "together")
    assert summary["status"] == "completed" and summary["ensemble"]["members"] == 2
    for seed in SEEDS:
        single = loop.run(singles[seed], tmp_path / str(seed))
        member = tmp_path / "together" / "members" / f"seed_{seed}"
        _same_records(_records(member), _records(tmp_path / str(seed)), case)
        mine = json.loads((member / "summary.json").read_text())
        assert mine["test"]["test/acc"] == pytest.approx(single["test"]["test/acc"], abs=1e-6), case
        for name in ("last.pt", "best.pt"):
            _same_weights(member / "checkpoints" / name, tmp_path / str(seed) / "checkpoints" / name, case)


@pytest.mark.parametrize("case", STOCHASTIC)
def test_random_options_give_each_member_its_own_draws(case, files, tmp_path: Path):
    overrides, data = _overrides(case, files)
    loop.run(make_config(*overrides, f"trainer.seeds={list(SEEDS)}", data=data), tmp_path)
    losses = [_records(tmp_path / "members" / f"seed_{s}")[-1]["train/loss"] for s in SEEDS]
    assert all(math.isfinite(v) for v in losses) and losses[0] != losses[1]


@pytest.mark.parametrize("case", REFUSED)
def test_what_members_do_not_support_is_refused_with_the_reason(case):
    companions = [c for c in COMPANIONS.get(case, []) if not c.startswith("data=")]
    with pytest.raises(ConfigError) as info:
        make_config(*case.split(), *companions, "trainer.seeds=[0,1]", data="digits")
    problem = next(p for p in info.value.problems if REFUSED[case] in p)
    assert problem.endswith("or train the seeds as separate runs: -m trainer.seed=0,1")


def test_the_lists_name_options_that_exist():
    """COMPARED takes every option the other two lists leave: a stale name there would leave its
    option compared when it is meant to be random or refused."""
    options = {o for g in GROUPS for o in _options(g)}
    assert {o for o in [*STOCHASTIC, *REFUSED] if o.split("=")[0] in GROUPS} <= options


def test_an_optimizer_that_is_not_elementwise_is_refused(monkeypatch):
    """A registry entry that does not declare an elementwise update is refused by members, and
    trains as a single run."""
    monkeypatch.setitem(optimizers.OPTIMIZERS, "lbfgs", optimizers.Optimizer("LBFGS", {"lr": float}, 2, False))
    raw = compose_raw("data=synthetic", "trainer.seeds=[0,1]")
    raw["optimizer"] = {"name": "lbfgs", "lr": 0.1}
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    assert info.value.problems == [
        "optimizer: trainer.seeds (members trained together) does not support optimizer=lbfgs: its update is not "
        "elementwise and proportional to its rate, so one optimizer over the stacked members would not update each "
        "as its own would; or train the seeds as separate runs: -m trainer.seed=0,1"
    ]
    raw["trainer"]["seeds"] = None
    assert parse_run_config(raw).optimizer.name == "lbfgs"


def test_members_under_torchrun_are_refused_before_anything_is_written(tmp_path: Path, monkeypatch):
    from dnnrun.training import distributed

    monkeypatch.setattr(distributed, "rank_world", lambda: (0, 2))  # as a process torchrun started
    with pytest.raises(UserError, match="members cannot run under torchrun .members share one process"):
        loop.run(make_config("trainer.seeds=[0,1]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_members_leave_run_directories_the_other_commands_read(tmp_path: Path):
    run = tmp_path / "run"
    args = ["trainer.seeds=[0,1]", "trainer.epochs=2", "model=cnn", "model.channels=[4]", "data=digits"]
    result = run_cli(*args, "regularizer=[dropout]", "regularizer.dropout.spatial=true", f"hydra.run.dir={run}",
                     "logger=tensorboard", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    parent = json.loads((run / "summary.json").read_text())
    assert parent["seeds"] == [0, 1] and set(parent["ensemble"]) == {"members", "test/acc", "test/loss"}
    assert parent["aggregate"]["test/acc"]["std"] is not None
    assert "2 members: trainer.seed=0,1" in (run / "run.log").read_text()
    member = run / "members" / "seed_1"
    assert "train_eval/loss" in read_jsonl(member / "metrics.jsonl")[-1]  # dropout: trainer.eval_train=auto
    assert list((member / "tensorboard").glob("events.out.tfevents.*"))  # each member's own logger
    assert not (member / "activations.json").exists()  # the plots' input: with trainer.diagnostics.plots=true
    model = dnnrun.load(member)  # mode=predict, evaluate, transfer and export read it as a single run's
    assert model.config.trainer.seed == 1 and model.config.trainer.seeds is None
    result = run_cli("mode=evaluate", f"evaluate.checkpoint={member / 'checkpoints' / 'best.pt'}",
                     f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["deterministic"]["accuracy"]
    assert accuracy == pytest.approx(json.loads((member / "summary.json").read_text())["test"]["test/acc"])
    result = run_cli("mode=evaluate", f"evaluate.checkpoint={run / 'checkpoints' / 'last.pt'}",
                     f"hydra.run.dir={tmp_path / 'eval2'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "holds 2 members trained together (trainer.seeds)" in result.stderr


def test_a_diverging_member_stops_and_the_others_go_on(tmp_path: Path, monkeypatch):
    """Seed 1's output layer starts infinite: its first loss is NaN. It is recorded as diverged and
    stops; seed 0 trains on exactly as its separate run (nothing of the NaN reaches it), and the
    run's checkpoints hold nothing that is not finite."""
    from dnnrun.training import runtime

    original = runtime.build_model

    def poisoned(cfg, data, model_cfg=None):
        model, reg = original(cfg, data, model_cfg)
        if model.output.weight.device.type != "meta" and torch.initial_seed() == 1:  # built after seeding with 1
            with torch.no_grad():
                model.output.weight.fill_(float("inf"))
        return model, reg

    monkeypatch.setattr(runtime, "build_model", poisoned)
    summary = loop.run(make_config("trainer.seeds=[0,1]", "trainer.epochs=2", data="digits"), tmp_path / "run")
    monkeypatch.setattr(runtime, "build_model", original)
    sick = json.loads((tmp_path / "run" / "members" / "seed_1" / "summary.json").read_text())
    assert sick["status"] == "diverged" and sick["diverged_at_step"] == 1 and sick["test"] is None
    assert sick["diagnosis"][0].startswith("training diverged at step 1: the training loss is nan")
    assert summary["diverged"] == [1] and summary["ensemble"]["members"] == 1
    assert not (tmp_path / "run" / "members" / "seed_1" / "checkpoints" / "last.pt").exists()  # no epoch of its own
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    tensors = [*saved["model"].values(), *(t for s in saved["optimizer"]["state"].values() for t in s.values())]
    assert all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor))
    loop.run(make_config("trainer.seed=0", "trainer.epochs=2", data="digits"), tmp_path / "single")
    _same_records(_records(tmp_path / "run" / "members" / "seed_0"), _records(tmp_path / "single"), "seed 0")


def test_when_every_member_diverges_the_run_has_diverged(tmp_path: Path):
    overrides = ["trainer.seeds=[0,1]", "trainer.epochs=2", "optimizer.lr=1e6"]
    with pytest.raises(Diverged, match="every member diverged"):
        loop.run(make_config(*overrides, data="digits"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"
    result = run_cli(*overrides, "data=digits", f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert result.returncode == 3 and "every member diverged" in result.stderr


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


def _members_state(run: Path, seeds=(0, 1)) -> tuple[list, list]:
    weights = [
        torch.load(run / "members" / f"seed_{s}" / "checkpoints" / "last.pt", weights_only=True)["model"] for s in seeds
    ]
    return weights, [_records(run / "members" / f"seed_{s}") for s in seeds]


def _same(a: Path, b: Path) -> bool:
    (wa, ma), (wb, mb) = _members_state(a), _members_state(b)
    return ma == mb and all(torch.equal(x[n], y[n]) for x, y in zip(wa, wb) for n in x)


class Crash(faults.Hook):
    """Raises after a step, as a process killed there would stop (its files as kill -9 leaves them)."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step: int) -> None:
        if step == self.step:
            raise RuntimeError("killed")


def test_members_stopped_mid_epoch_resume_from_that_step(tmp_path: Path):
    """A crash in the second epoch (the first epoch's checkpoint, the second half done), then
    trainer.resume=auto: bit-identical members, dropout masks and shuffles included. SIGTERM after
    step 50 (the 9th of epoch 2): the run stops after that step, saves it, says so, and the resume
    goes on from that step exactly."""
    args = ["trainer.seeds=[0,1]", "trainer.epochs=3", "trainer.batch_size=32", "regularizer=[dropout]"]
    loop.run(make_config(*args, data="digits"), tmp_path / "straight")  # 41 steps an epoch
    with pytest.raises(RuntimeError, match="killed"):
        loop.run(make_config(*args, data="digits"), tmp_path / "killed", hook=Crash(60))
    assert len(read_jsonl(tmp_path / "killed" / "members" / "seed_0" / "metrics.jsonl")) == 1
    loop.run(make_config(*args, "trainer.resume=auto", data="digits"), tmp_path / "killed")
    assert _same(tmp_path / "killed", tmp_path / "straight")
    with pytest.raises(UserError, match="already holds a checkpoint"):  # without trainer.resume: never overwritten
        loop.run(make_config(*args, data="digits"), tmp_path / "killed")

    stopped = tmp_path / "stopped"
    with pytest.raises(Interrupted) as info:
        loop.run(make_config(*args, data="digits"), stopped, hook=faults.parse("term@step=50"))
    assert info.value.signum == signal.SIGTERM
    saved = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert saved["trainer"]["step"] + saved["trainer"]["progress"]["batches"] == 50
    log = (stopped / "run.log").read_text()
    assert "stopped by SIGTERM during epoch 2, after step 50: checkpoints/last.pt continues from there" in log
    loop.run(make_config(*args, "trainer.resume=auto", data="digits"), stopped)
    assert (
        f"resumed from {stopped / 'checkpoints' / 'last.pt'} during epoch 2, after step 50"
        in (stopped / "run.log").read_text()
    )
    assert _same(stopped, tmp_path / "straight")


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
    loop.run(make_config(*overrides, "trainer.seeds=[0,1]", data="digits"), tmp_path / "together")
    rates = set()
    for seed in (0, 1):
        loop.run(make_config(*overrides, f"trainer.seed={seed}", data="digits"), tmp_path / str(seed))
        mine = read_jsonl(tmp_path / "together" / "members" / f"seed_{seed}" / "metrics.jsonl")
        theirs = read_jsonl(tmp_path / str(seed) / "metrics.jsonl")
        assert [r["lr"] for r in mine] == pytest.approx([r["lr"] for r in theirs])
        # each update scaled, not computed at the rate: equal to rounding
        assert [r["val/loss"] for r in mine] == pytest.approx([r["val/loss"] for r in theirs], rel=1e-4)
        rates.add(tuple(r["lr"] for r in mine))
    assert any(len(set(r)) > 1 for r in rates)  # the rate was cut


def test_members_draw_their_plots_when_asked(tmp_path: Path):
    loop.run(make_config(*SMALL, "trainer.seeds=[0,1]", "trainer.diagnostics.plots=true"), tmp_path)
    for seed in (0, 1):
        member = tmp_path / "members" / f"seed_{seed}"
        assert (member / "plots" / "learning_curves.png").is_file()
        assert set(json.loads((member / "activations.json").read_text())) == {"start", "end"}


def test_a_finished_members_run_resumed_ends_as_it_did(tmp_path: Path):
    """Dropout and batch norm: resuming after the last epoch trains nothing more and tests the same
    best weights again."""
    args = [*SMALL, "trainer.seeds=[0,1]", "regularizer=[dropout]", "norm=batchnorm"]
    first = loop.run(make_config(*args), tmp_path)
    again = loop.run(make_config(*args, "trainer.resume=auto"), tmp_path)
    assert again["status"] == "completed" and again["aggregate"] == first["aggregate"]


def test_members_signalled_twice_end_as_a_single_run_does(tmp_path: Path):
    """A real process: SIGINT after step 5, again during the checkpoint's write and while the end is
    recorded: exit 130, no traceback, the checkpoint whole, and the resume ends as a run never
    stopped. (kill -9 leaves the files as test_members_stopped_mid_epoch_resume_from_that_step's crash.)"""
    args = [*SMALL[:1], "trainer.seeds=[0,1]", "trainer.epochs=2", "regularizer=[dropout]", "data=synthetic"]
    loop.run(make_config(*args), tmp_path / "straight")
    run = tmp_path / "signalled"
    faults_env = {"DNNRUN_FAULT": "int@step=5,int@save=1,int@status=1"}
    result = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path, env=faults_env, process=True)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    loop.run(make_config(*args, "trainer.resume=auto"), run)
    assert _same(run, tmp_path / "straight")
