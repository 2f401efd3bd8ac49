"""Learning-rate schedules by name, as closed forms of the step or epoch count t.

Each entry says whether t counts optimizer steps or epochs. A schedule computes the rate for the
optimizer's `lr` (lr0 below) and scales every param group by the same ratio, so groups that start
at different rates keep their proportions.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from dnnrun.config.schema import FRACTION, NON_NEGATIVE, POSITIVE, Choice, Problems, check_rules, parse_choice
from dnnrun.training.metrics import better

if TYPE_CHECKING:
    import torch

Rate = Callable[[int], float]  # t -> learning rate


def constant(lr0: float, total: int) -> Rate:
    return lambda t: lr0


def power(lr0: float, total: int, steps: float = 1000.0, power: float = 1.0) -> Rate:
    """lr0 / (1 + t / steps) ** power: halves after `steps` steps (power 1), then ever more slowly."""
    return lambda t: lr0 / (1 + t / steps) ** power


def exponential(lr0: float, total: int, steps: float = 10000.0) -> Rate:
    """lr0 * 0.1 ** (t / steps): ten times smaller every `steps` steps."""
    return lambda t: lr0 * 0.1 ** (t / steps)


def piecewise_constant(
    lr0: float, total: int, boundaries: tuple[int, ...] = (10, 20), values: tuple[float, ...] = (0.01, 0.005, 0.001)
) -> Rate:
    """values[0] until epoch boundaries[0], values[1] until boundaries[1], ...: the rates themselves."""
    return lambda t: values[bisect.bisect_right(boundaries, t)]


def cosine(lr0: float, total: int, min_lr: float = 0.0) -> Rate:
    """Half a cosine from lr0 at t = 0 down to min_lr at the last step."""
    return lambda t: min_lr + (lr0 - min_lr) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


class OneCycle:
    """1cycle (Smith 2018): the rate rises linearly from lr0 to max_lr over the first half of the
    cycle and falls back to lr0 over the second; the last `annihilation` fraction of the steps then
    takes it down to lr0 / final_div. SGD's momentum moves the opposite way, between the two values
    of `momentum` (only when the optimizer uses momentum)."""

    def __init__(
        self,
        lr0: float,
        total: int,
        max_lr: float | None = None,  # null: 10 x lr0
        annihilation: float = 0.1,
        final_div: float = 1000.0,
        momentum: tuple[float, float] = (0.85, 0.95),
    ):
        self.lr0, self.max_lr, self.final_div = lr0, max_lr if max_lr is not None else 10 * lr0, final_div
        self.tail = round(annihilation * total)
        self.half = (total - self.tail) / 2
        self.low_momentum, self.high_momentum = momentum

    def _phase(self, t: int) -> tuple[str, float]:
        """Which part of the cycle t is in, and how far through it (0..1)."""
        if t < self.half:
            return "up", t / self.half
        if t < 2 * self.half:
            return "down", (t - self.half) / self.half
        return "tail", min(1.0, (t - 2 * self.half) / self.tail) if self.tail else 1.0

    def __call__(self, t: int) -> float:
        phase, x = self._phase(t)
        if phase == "up":
            return self.lr0 + (self.max_lr - self.lr0) * x
        if phase == "down":
            return self.max_lr - (self.max_lr - self.lr0) * x
        return self.lr0 - (self.lr0 - self.lr0 / self.final_div) * x

    def momentum(self, t: int) -> float:
        phase, x = self._phase(t)
        span = self.high_momentum - self.low_momentum
        if phase == "up":
            return self.high_momentum - span * x
        if phase == "down":
            return self.low_momentum + span * x
        return self.high_momentum


class Performance:
    """Performance scheduling (ReduceLROnPlateau): the rate is multiplied by `factor` whenever
    `monitor` has not improved for `patience` evaluations, down to `min_lr`."""

    def __init__(
        self,
        lr0: float,
        total: int,
        factor: float = 0.5,
        patience: int = 5,
        min_lr: float = 0.0,
        monitor: Literal["val/loss", "val/acc"] = "val/loss",
        min_delta: float = 0.0,
    ):
        self.lr, self.factor, self.patience, self.min_lr = lr0, factor, patience, min_lr
        self.monitor, self.min_delta = monitor, min_delta
        self.best: float | None = None
        self.bad = 0

    def observe(self, metrics: dict[str, float]) -> None:
        value = metrics[self.monitor]
        if self.best is None or better(self.monitor, value, self.best, self.min_delta):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.bad = 0

    def __call__(self, t: int) -> float:
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    build: Callable[..., Rate]  # (lr0, total, **params) -> rate of t; total counts steps or epochs
    per: Literal["step", "epoch"]
    # the rate follows a run's metrics (its `observe`): members of trainer.seeds each get their own
    reacts: bool = False


SCHEDULES = {
    "constant": ScheduleKind(constant, per="epoch"),
    "power": ScheduleKind(power, per="step"),
    "exponential": ScheduleKind(exponential, per="step"),
    "piecewise_constant": ScheduleKind(piecewise_constant, per="epoch"),
    "performance": ScheduleKind(Performance, per="epoch", reacts=True),
    "onecycle": ScheduleKind(OneCycle, per="step"),
    "cosine": ScheduleKind(cosine, per="step"),
}

RULES = {
    "steps": POSITIVE,
    "power": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "max_lr": POSITIVE,
    "annihilation": FRACTION,
    "final_div": POSITIVE,
    "factor": POSITIVE,
    "patience": POSITIVE,
}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    choice = parse_choice(raw, SCHEDULES, key, "schedule", problems)
    if choice is None:
        return None
    p = choice.params
    check_rules(p, RULES, key, problems)
    if choice.name == "piecewise_constant":
        boundaries, values = p.get("boundaries", (10, 20)), p.get("values", (0.01, 0.005, 0.001))
        if len(values) != len(boundaries) + 1:
            problems.add(
                f"{key}.values", f"needs one more entry than boundaries ({len(boundaries)}), got {len(values)}"
            )
        if list(boundaries) != sorted(boundaries) or any(not isinstance(b, int) or b < 1 for b in boundaries):
            problems.add(f"{key}.boundaries", f"must be increasing epoch numbers >= 1, got {list(boundaries)}")
        if any(v <= 0 for v in values):
            problems.add(f"{key}.values", f"learning rates must be > 0, got {list(values)}")
    if choice.name == "performance" and p.get("factor", 0.5) >= 1:
        problems.add(f"{key}.factor", f"must be below 1 to reduce the rate, got {p['factor']}")
    if choice.name == "onecycle" and "momentum" in p:
        low_high = p["momentum"]
        if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] < 1:
            problems.add(f"{key}.momentum", f"must be [low, high] with 0 <= low <= high < 1, got {list(low_high)}")
    return choice


class Schedule:
    """Sets every param group's rate (and, for 1cycle with SGD momentum, its momentum) for t."""

    def __init__(self, choice: Choice, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        self.choice = choice
        self.per = SCHEDULES[choice.name].per
        self.total = steps_per_epoch * epochs if self.per == "step" else epochs
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.rate = self._build()
        self.t = 0
        self._apply()

    def _build(self) -> Rate:
        return SCHEDULES[self.choice.name].build(self.base_lrs[0], self.total, **self.choice.params)

    def _apply(self) -> None:
        scale = self.rate(self.t) / self.base_lrs[0]
        cycle_momentum = hasattr(self.rate, "momentum")
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
            if cycle_momentum and group.get("momentum", 0) > 0:
                group["momentum"] = self.rate.momentum(self.t)

    def scale_reused(self, factor: float) -> None:
        """Multiply the rate of the param groups reused from a transfer source (on unfreezing)."""
        for i, group in enumerate(self.optimizer.param_groups):
            if group.get("reused"):
                self.base_lrs[i] *= factor
        self._apply()

    def step(self, metrics: dict[str, float] | None = None) -> None:
        """Advance by one step or one epoch; an epoch's validation metrics feed performance scheduling."""
        self.t += 1
        if hasattr(self.rate, "observe"):
            self.rate.observe(metrics)
        self._apply()

    def after_step(self) -> None:
        """The training loop's call after every optimizer step: advances the schedules that count steps."""
        if self.per == "step":
            self.step()

    def end_epoch(self, record: dict[str, float]) -> None:
        """The training loop's call after every epoch, with its record: advances those that count epochs."""
        if self.per == "epoch":
            self.step(record)

    def state_dict(self) -> dict[str, Any]:
        state = {"t": self.t, "base_lrs": list(self.base_lrs), "total": self.total}
        if hasattr(self.rate, "state_dict"):
            state["rate"] = self.rate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed schedule keeps the length it started with: a run resumed with more epochs goes
        on along the same curve (1cycle stays annihilated, cosine at its minimum) rather than
        jumping to the curve of the longer run."""
        self.t = state["t"]
        self.base_lrs = list(state["base_lrs"])
        self.total = state["total"]
        self.rate = self._build()
        if "rate" in state:
            self.rate.load_state_dict(state["rate"])
        self._apply()
