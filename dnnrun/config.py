"""The whole run's config, checked group by group before anything is trained."""

from __future__ import annotations

import dataclasses
from typing import Any

from dnnrun import activations, init, loggers, optim, regularizers, schedules
from dnnrun.data import DataConfig, parse_data
from dnnrun.model import MODELS, ModelConfig
from dnnrun.norms import NormConfig, parse_norm
from dnnrun.schema import Choice, Problems, did_you_mean, parse
from dnnrun.train import TrainerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    init: Choice
    act: Choice
    norm: NormConfig
    optimizer: Choice
    schedule: Choice
    regularizer: list[Choice]
    trainer: TrainerConfig
    logger: Choice
    raw: dict[str, Any]  # the plain config as composed, stored in checkpoints and summaries


# Each group's checker: (plain data, key, problems) -> the typed config, or None after a problem.
GROUPS = {
    "data": parse_data,
    "model": lambda raw, key, problems: parse(ModelConfig, raw, key, problems, registry=MODELS, kind="model"),
    "init": init.parse,
    "act": activations.parse,
    "norm": parse_norm,
    "optimizer": optim.parse,
    "schedule": schedules.parse,
    "regularizer": regularizers.parse,
    "trainer": lambda raw, key, problems: parse(TrainerConfig, raw, key, problems),
    "logger": loggers.parse,
}


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Check every group and raise one ConfigError listing every problem found."""
    problems = Problems()
    for key in raw:
        if key not in GROUPS:
            problems.add(key, f"unknown top-level key; valid: {', '.join(GROUPS)}{did_you_mean(key, GROUPS)}")
    parsed = {}
    for key, check in GROUPS.items():
        if key not in raw:
            problems.add(key, "missing")
            continue
        parsed[key] = check(raw[key], key, problems)
    problems.raise_if_any()
    return RunConfig(**parsed, raw=raw)
