"""The whole run's config, checked group by group before anything is trained."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from dnnrun import activations, init, loggers, optim, pretrain, regularizers, schedules
from dnnrun.data import DataConfig, parse_data
from dnnrun.evaluate import EvaluateConfig
from dnnrun.lr_find import LRFindConfig
from dnnrun.model import MODELS, ModelConfig
from dnnrun.norms import NormConfig, parse_norm
from dnnrun.schema import Choice, Problems, check_value, did_you_mean, parse
from dnnrun.train import TrainerConfig
from dnnrun.transfer import TransferConfig

Mode = Literal["train", "lr_find", "evaluate"]


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
    pretrain: Choice
    transfer: TransferConfig
    mode: Mode  # train | lr_find (the learning-rate range test) | evaluate (a checkpoint, MC dropout)
    outputs: str  # the root that run and sweep directories must stay under
    lr_find: LRFindConfig
    evaluate: EvaluateConfig
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
    "pretrain": pretrain.parse,
    "transfer": lambda raw, key, problems: parse(TransferConfig, raw, key, problems),
    "mode": lambda raw, key, problems: raw if check_value(raw, Mode, key, problems) else None,
    "outputs": lambda raw, key, problems: raw if check_value(raw, str, key, problems) else None,
    "lr_find": lambda raw, key, problems: parse(LRFindConfig, raw, key, problems),
    "evaluate": lambda raw, key, problems: parse(EvaluateConfig, raw, key, problems),
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
    if not problems.items:
        _check_across_groups(parsed, problems)
    problems.raise_if_any()
    return RunConfig(**parsed, raw=raw)


def _check_across_groups(cfg: dict[str, Any], problems: Problems) -> None:
    """Combinations that cannot work (combinations that merely work badly are warnings: advice.py)."""
    if cfg["pretrain"].name != "none" and cfg["transfer"].source is not None:
        problems.add("pretrain", "pretraining and transfer.source both set the hidden layers' starting weights; choose one")
    if cfg["pretrain"].name == "rbm" and (cfg["act"].name != "sigmoid" or cfg["norm"].name != "none"):
        problems.add("pretrain", f"rbm pretraining needs sigmoid units and no norm layers (act=sigmoid norm=none), "
                                 f"got act={cfg['act'].name} norm={cfg['norm'].name}")
    if cfg["mode"] == "evaluate" and cfg["evaluate"].checkpoint is None:
        problems.add("evaluate.checkpoint", "mode=evaluate needs the checkpoint to evaluate: evaluate.checkpoint=PATH")
