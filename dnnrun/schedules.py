"""Learning-rate schedules by name, as closed forms of the step or epoch count.

Each entry says whether it advances per optimizer step or per epoch. A schedule multiplies each
param group's initial learning rate (the optimizer's `lr`) by factor(t).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from dnnrun.schema import Choice, Problems, parse_choice

Factor = Callable[[int], float]


def constant(total: int) -> Factor:
    return lambda t: 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    build: Callable[..., Factor]  # (total, **params) -> factor of t; total counts steps or epochs
    per: Literal["step", "epoch"]


SCHEDULES = {
    "constant": ScheduleKind(build=constant, per="epoch"),
}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    return parse_choice(raw, SCHEDULES, key, "schedule", problems)


class Schedule:
    """Sets every param group's lr to its initial lr times factor(t)."""

    def __init__(self, choice: Choice, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        kind = SCHEDULES[choice.name]
        self.per = kind.per
        total = steps_per_epoch * epochs if kind.per == "step" else epochs
        self.factor = kind.build(total, **choice.params)
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.t = 0
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.t)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.t += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"t": self.t, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()
