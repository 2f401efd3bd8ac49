"""Each schedule's learning rate over its steps equals its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config
from dnnrun.cli import CONFIG_DIR
from dnnrun.optim.schedules import SCHEDULES, Schedule
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import loop

LR0, STEPS_PER_EPOCH, EPOCHS = 0.1, 10, 6
OPTIONS = sorted(p.stem for p in (CONFIG_DIR / "schedule").glob("*.yaml"))


def _schedule(option: str, *overrides: str, optimizer: str = "sgd") -> tuple[Schedule, torch.optim.Optimizer]:
    cfg = make_config(f"schedule={option}", f"optimizer={optimizer}", f"optimizer.lr={LR0}", *overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0, momentum=cfg.optimizer.params["momentum"])
    return Schedule(cfg.schedule, opt, STEPS_PER_EPOCH, EPOCHS), opt


def _rates(schedule: Schedule, opt, n: int) -> list[float]:
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(n):
        schedule.step({"val/loss": 1.0, "val/acc": 0.0})
        rates.append(opt.param_groups[0]["lr"])
    return rates


def test_every_schedule_says_whether_it_steps_per_batch_or_per_epoch():
    assert {name: kind.per for name, kind in SCHEDULES.items()} == {
        "constant": "epoch",
        "power": "step",
        "exponential": "step",
        "piecewise_constant": "epoch",
        "performance": "epoch",
        "onecycle": "step",
        "cosine": "step",
    }
    assert sorted(SCHEDULES) == OPTIONS


TOTAL = STEPS_PER_EPOCH * EPOCHS
CLOSED_FORMS = {
    ("constant",): (EPOCHS, lambda t: LR0),
    ("power", "schedule.steps=20", "schedule.power=2"): (TOTAL, lambda t: LR0 / (1 + t / 20) ** 2),
    ("exponential", "schedule.steps=20"): (TOTAL, lambda t: LR0 * 0.1 ** (t / 20)),
    ("piecewise_constant", "schedule.boundaries=[2,4]", "schedule.values=[0.1,0.05,0.01]"): (
        EPOCHS,
        lambda t: 0.1 if t < 2 else 0.05 if t < 4 else 0.01,
    ),
    ("cosine", "schedule.min_lr=0.001"): (
        TOTAL,
        lambda t: 0.001 + (LR0 - 0.001) * (1 + math.cos(math.pi * t / TOTAL)) / 2,
    ),
}


@pytest.mark.parametrize("spec", CLOSED_FORMS, ids=[s[0] for s in CLOSED_FORMS])
def test_rate_follows_the_closed_form(spec):
    n, form = CLOSED_FORMS[spec]
    schedule, opt = _schedule(*spec)
    assert _rates(schedule, opt, n) == pytest.approx([form(t) for t in range(n + 1)], rel=1e-12)


def test_onecycle_rises_falls_then_annihilates_with_momentum_opposite():
    schedule, opt = _schedule(
        "onecycle", "schedule.max_lr=1.0", "schedule.annihilation=0.1", "schedule.final_div=1000", optimizer="momentum"
    )
    momenta = [opt.param_groups[0]["momentum"]]
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(TOTAL):
        schedule.step()
        rates.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
    # 60 steps: 6 annihilation steps, 27 up, 27 down
    assert rates[0] == pytest.approx(LR0) and rates[27] == pytest.approx(1.0) and rates[54] == pytest.approx(LR0)
    assert rates[60] == pytest.approx(LR0 / 1000)
    assert rates[13] == pytest.approx(LR0 + (1.0 - LR0) * 13 / 27)  # linear on the way up
    assert rates[40] == pytest.approx(1.0 - (1.0 - LR0) * 13 / 27)  # and down
    assert rates[57] == pytest.approx(LR0 - (LR0 - LR0 / 1000) * 3 / 6)
    assert (
        momenta[0] == pytest.approx(0.95) and momenta[27] == pytest.approx(0.85) and momenta[54] == pytest.approx(0.95)
    )
    assert momenta[13] == pytest.approx(0.95 - 0.1 * 13 / 27)
    assert all(m == pytest.approx(0.95) for m in momenta[54:])


def test_onecycle_leaves_momentum_alone_without_momentum_and_peaks_at_ten_times_lr_by_default():
    schedule, opt = _schedule("onecycle", optimizer="sgd")
    rates = _rates(schedule, opt, 27)
    assert rates[27] == pytest.approx(10 * LR0)
    assert opt.param_groups[0]["momentum"] == 0


def test_performance_scheduling_reacts_to_a_scripted_metric():
    cfg = make_config("schedule=performance", "schedule.patience=2", "schedule.factor=0.5", f"optimizer.lr={LR0}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0)
    schedule = Schedule(cfg.schedule, opt, STEPS_PER_EPOCH, EPOCHS)
    losses = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.71, 0.72, 0.73]
    rates = []
    for loss in losses:
        schedule.step({"val/loss": loss, "val/acc": 0.0})
        rates.append(opt.param_groups[0]["lr"])
    # best 0.8 at epoch 2; epochs 3-4 do not improve -> halve; 0.7 improves; 6-7 stall -> halve; 8-9 stall -> halve
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.0125])
    # the state survives a checkpoint
    restored = Schedule(cfg.schedule, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0), 1, 1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_param_groups_keep_their_proportions():
    cfg = make_config("schedule=exponential", "schedule.steps=10", f"optimizer.lr={LR0}")
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": LR0 / 10}], lr=LR0)
    schedule = Schedule(cfg.schedule, opt, 10, 1)
    for _ in range(5):
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0 * 0.1**0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(LR0 / 10 * 0.1**0.5)


def test_the_training_loop_steps_schedules_per_batch_and_per_epoch(tmp_path):
    # 864 examples / 32 per batch = 27 steps per epoch
    loop.run(make_config("trainer.epochs=2", "schedule=exponential", "schedule.steps=27"), tmp_path / "step")
    rates = [r["lr"] for r in read_jsonl(tmp_path / "step" / "metrics.jsonl")]
    # the rate of each epoch's last step: t = 26 and t = 53
    assert rates == pytest.approx([0.01 * 0.1 ** (26 / 27), 0.01 * 0.1 ** (53 / 27)])

    loop.run(
        make_config(
            "trainer.epochs=3",
            "schedule=piecewise_constant",
            "schedule.boundaries=[1,2]",
            "schedule.values=[0.01,0.005,0.001]",
        ),
        tmp_path / "epoch",
    )
    assert [r["lr"] for r in read_jsonl(tmp_path / "epoch" / "metrics.jsonl")] == pytest.approx([0.01, 0.005, 0.001])
