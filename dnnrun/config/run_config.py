"""The whole run's config, checked group by group before anything is trained: the groups'
schemas (dataclasses here and in each concern's module, or a registry's `Choice`), the checks
across groups, and the settings that never change what a run computes.

Checking a config imports no torch (it takes seconds): the concern modules import it in the
functions that build and train, not at the top."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from dnnrun.config.schema import Choice, Problems, check_value, did_you_mean, parse
from dnnrun.data.datasets import NOT_IMAGES, DataConfig, parse_data
from dnnrun.insight import loggers
from dnnrun.models import registry
from dnnrun.optim import optimizers, schedules
from dnnrun.techniques import activations, init, regularizers
from dnnrun.techniques.norms import NormConfig, parse_norm
from dnnrun.training import pretrain
from dnnrun.training.early_stopping import EarlyStoppingConfig

Mode = Literal["train", "lr_find", "evaluate", "predict"]


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    # optimizer steps between per-layer statistics; 0: off; auto: 100 where the engine supports them
    # (a single run), off where it does not (trainer.seeds' members: training/engine.py)
    every: int | Literal["auto"] = "auto"
    # write plots/ at the end of the run; auto: for a single run, not for each job of a sweep (drawing
    # takes longer than a short job; the sweep's report compares the jobs, `dnnrun-plot RUN_DIR` draws one)
    plots: bool | Literal["auto"] = "auto"

    def check(self, problems, key: str) -> None:
        if self.every != "auto" and self.every < 0:
            problems.add(f"{key}.every", f"must be >= 0 (0: off), got {self.every}")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    source: str | None = None  # a dnnrun checkpoint (e.g. outputs/task_a/checkpoints/best.pt); null: no transfer
    layers: int | None = None  # reuse the source's first k hidden layers; null: all of them
    replace: int | None = None  # give this reused hidden layer (1-based) fresh weights, e.g. layers=4 replace=4
    add: list[int] = dataclasses.field(default_factory=list)  # widths of new hidden layers on top
    freeze: bool = False  # keep the reused layers' weights (and batch-norm statistics) fixed
    unfreeze_after: int | None = None  # epochs after which frozen layers train again; null: never
    unfreeze_lr_factor: float = 1.0  # multiplies the reused layers' learning rate when they unfreeze

    def check(self, problems: Problems, key: str) -> None:
        for name in ("layers", "replace", "unfreeze_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.add(f"{key}.{name}", f"must be >= 1 or null, got {value}")
        if any(w < 1 for w in self.add):
            problems.add(f"{key}.add", f"every width must be >= 1, got {self.add}")
        if self.unfreeze_lr_factor <= 0:
            problems.add(f"{key}.unfreeze_lr_factor", f"must be > 0, got {self.unfreeze_lr_factor}")
        if self.replace is not None and self.layers is not None and self.replace > self.layers:
            problems.add(f"{key}.replace", f"must be one of the reused layers 1..{self.layers}, got {self.replace}")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 32
    eval_batch_size: int = 1024  # evaluation only: larger is faster and changes nothing
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N | mps
    seed: int = 0  # one seed for initialization, shuffling and dropout
    seeds: list[int] | None = None  # train one member per seed together (training/members.py), in place of seed
    deterministic: bool = False  # deterministic kernels only (slower on GPU)
    # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); auto: for conv nets
    amp: bool | Literal["auto"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # conv nets in the NHWC memory format; auto: on CUDA
    compile: bool = False  # the training forward pass through torch.compile (falls back with a warning)
    # after each epoch, the loss and accuracy of a fixed subset of the training set in evaluation mode
    # (train_eval/loss, train_eval/acc), comparable with validation's; auto: when the model has dropout or batch norm
    eval_train: bool | Literal["auto"] = "auto"
    eval_train_size: int = 5000  # examples in that subset (all, for a smaller training set)
    clip_value: float | None = None  # clip each gradient element to [-v, v]
    clip_norm: float | None = None  # rescale the gradients when their global L2 norm exceeds this
    monitor: Literal["val/loss", "val/acc"] = "val/loss"  # picks best.pt and drives early stopping
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    restore_best: bool = True  # test (and leave in memory) the best epoch's weights, not the last
    resume: str | None = None  # null: fresh start | auto: last.pt in the run directory | a checkpoint path
    force_resume: bool = False  # resume even when settings that change the result differ from the checkpoint's
    limit_batches: int | None = None  # train on at most this many batches per epoch (debugging)
    detect_anomaly: bool = False  # autograd anomaly detection: names the op that made a NaN (slow)
    progress: bool = True  # Rich progress bar (on terminals only)
    threads: int | None = None  # CPU threads for torch; null: PyTorch's choice (a parallel sweep divides the cores)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    option: str | None = None  # the YAML it came from (conf/trainer/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "limit_batches", "threads", "eval_train_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.add(f"{key}.{name}", f"must be >= 1, got {value}")
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.add(f"{key}.{name}", f"must be > 0 or null, got {value}")
        if not 0 <= self.seed < 2**32:  # what numpy's generator takes
            problems.add(f"{key}.seed", f"must be in [0, 2**32), got {self.seed}")
        if self.seeds is not None and self.seed != 0:
            problems.add(
                f"{key}.seed",
                f"{self.seed} beside {key}.seeds={self.seeds}: the members' seeds are trainer.seeds, and "
                f"trainer.seed would be ignored; give one of them",
            )
        if self.seeds is not None and (
            len(self.seeds) < 2
            or len(set(self.seeds)) != len(self.seeds)
            or not all(0 <= s < 2**32 for s in self.seeds)
        ):
            problems.add(
                f"{key}.seeds",
                f"must list two or more distinct seeds in [0, 2**32) (or null: one run "
                f"with trainer.seed), got {self.seeds}",
            )
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            problems.add(f"{key}.device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        patience = self.early_stopping.patience
        if patience is not None and patience < 1:
            problems.add(f"{key}.early_stopping.patience", f"must be >= 1 or null, got {patience}")
        if self.early_stopping.min_delta < 0:
            problems.add(f"{key}.early_stopping.min_delta", f"must be >= 0, got {self.early_stopping.min_delta}")


@dataclasses.dataclass(frozen=True)
class LRFindConfig:
    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 300  # the rate reaches end_lr at the last step
    smoothing: float = 0.98  # weight of the past in the loss's moving average
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum

    def check(self, problems: Problems, key: str) -> None:
        if not 0 < self.start_lr < self.end_lr:
            problems.add(f"{key}.start_lr", f"must be > 0 and below end_lr ({self.end_lr}), got {self.start_lr}")
        if self.steps < 10:
            problems.add(f"{key}.steps", f"must be >= 10, got {self.steps}")
        if not 0 <= self.smoothing < 1:
            problems.add(f"{key}.smoothing", f"must be in [0, 1), got {self.smoothing}")
        if self.diverge_factor <= 1:
            problems.add(f"{key}.diverge_factor", f"must be > 1, got {self.diverge_factor}")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str | None = None  # the dnnrun checkpoint to evaluate (mode=evaluate)
    split: Literal["test", "val"] = "test"
    mc_samples: int = 0  # > 0: also MC dropout with this many stochastic passes
    bins: int = 15  # confidence bins for the expected calibration error

    def check(self, problems: Problems, key: str) -> None:
        if self.mc_samples < 0:
            problems.add(f"{key}.mc_samples", f"must be >= 0, got {self.mc_samples}")
        if self.bins < 1:
            problems.add(f"{key}.bins", f"must be >= 1, got {self.bins}")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    checkpoint: str | None = None  # a run directory, a checkpoint or an export (mode=predict)
    input: str | None = None  # a .npy, .npz or .csv file of raw examples, or a folder of image files
    mc_samples: int = 0  # > 0: MC dropout, the mean of this many passes with dropout on

    def check(self, problems: Problems, key: str) -> None:
        if self.mc_samples < 0:
            problems.add(f"{key}.mc_samples", f"must be >= 0, got {self.mc_samples}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: Any  # the chosen architecture's config (models/registry.py: MODELS)
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
    mode: Mode  # train | lr_find (the learning-rate range test) | evaluate (a checkpoint, MC dropout) | predict
    outputs: str  # the root that run and sweep directories must stay under
    lr_find: LRFindConfig
    evaluate: EvaluateConfig
    predict: PredictConfig
    raw: dict[str, Any]  # the plain config as composed, stored in checkpoints and summaries

    def choices(self) -> dict[str, str]:
        """The option of every group, in the order of conf/config.yaml's defaults: {"init": "he_normal", ...}.
        Each option's YAML names itself (`option:`); a config saved before that falls back to the
        registry name."""
        groups = {
            "data": self.data,
            "model": self.model,
            "init": self.init,
            "act": self.act,
            "norm": self.norm,
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "regularizer": None,
            "trainer": self.trainer,
            "logger": self.logger,
            "pretrain": self.pretrain,
        }
        chosen = {g: getattr(c, "option", None) or getattr(c, "name", "?") for g, c in groups.items()}
        chosen["regularizer"] = "[" + ",".join(self.raw.get("regularizer") or {}) + "]"
        return chosen

    def options(self) -> str:
        """choices() as on a command line: `data=digits model=mlp init=he_normal ...`."""
        return " ".join(f"{group}={option}" for group, option in self.choices().items())


# Each group's checker: (plain data, key, problems) -> the typed config, or None after a problem.
GROUPS = {
    "data": parse_data,
    "model": registry.parse,
    "init": init.parse,
    "act": activations.parse,
    "norm": parse_norm,
    "optimizer": optimizers.parse,
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
    "predict": lambda raw, key, problems: parse(PredictConfig, raw, key, problems),
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
    """Combinations that cannot work (combinations that merely work badly are warnings: insight/advice.py)."""
    if cfg["pretrain"].name != "none" and cfg["transfer"].source is not None:
        problems.add(
            "pretrain", "pretraining and transfer.source both set the hidden layers' starting weights; choose one"
        )
    if cfg["pretrain"].name == "rotation" and cfg["data"].name in NOT_IMAGES:
        problems.add(
            "pretrain",
            f"pretrain=rotation rotates square images; data={cfg['data'].name}'s examples are vectors "
            "(use an image set, e.g. data=digits, or pretrain=autoencoder)",
        )
    if cfg["pretrain"].name == "rbm" and (cfg["act"].name != "sigmoid" or cfg["norm"].name != "none"):
        problems.add(
            "pretrain",
            f"rbm pretraining needs sigmoid units and no norm layers (act=sigmoid norm=none), "
            f"got act={cfg['act'].name} norm={cfg['norm'].name}",
        )
    name = cfg["model"].name
    if registry.MODELS[name].images and cfg["data"].name in NOT_IMAGES:
        problems.add(
            "model",
            f"model={name} needs images; data={cfg['data'].name}'s examples are vectors "
            f"(use an image set, e.g. data=digits, or model=mlp)",
        )
    if cfg["pretrain"].name in ("autoencoder", "rbm") and name != "mlp":
        problems.add(
            "pretrain",
            f"pretrain={cfg['pretrain'].name} pretrains dense layers one by one: model=mlp "
            f"only; for model={name} use pretrain=rotation or pretrain=corrupted",
        )
    if name == "zoo":
        transfer = cfg["transfer"]
        if transfer.source is not None or transfer.add or transfer.replace is not None:
            problems.add(
                "transfer",
                "model=zoo reuses the weights of model.weights; transfer.source, transfer.add and "
                "transfer.replace are for dnnrun's own models (transfer.layers counts its stages)",
            )
        if transfer.freeze and cfg["model"].weights is None:
            problems.add(
                "transfer.freeze",
                "keeps reused weights fixed, but model.weights is null: give the weights to reuse (model.weights=PATH)",
            )
    if cfg["trainer"].seeds is not None:
        _check_members(cfg, problems)
    if cfg["mode"] == "evaluate" and cfg["evaluate"].checkpoint is None:
        problems.add("evaluate.checkpoint", "mode=evaluate needs the checkpoint to evaluate: evaluate.checkpoint=PATH")
    if cfg["mode"] == "predict":
        for name, what in (
            ("checkpoint", "the model: a run directory or a checkpoint"),
            ("input", "the examples: a .npy, .npz or .csv file, or a folder of images"),
        ):
            if getattr(cfg["predict"], name) is None:
                problems.add(f"predict.{name}", f"mode=predict needs {what}: predict.{name}=PATH")


def _check_members(cfg: dict[str, Any], problems: Problems) -> None:
    """What the members of trainer.seeds cannot do, each refused with its reason: what their engine
    does not declare (training/engine.py's STACKED), an optimizer whose update is not elementwise,
    a model that cannot be stacked (their registries' declarations), a mode other than train."""
    from dnnrun.training.engine import STACKED

    tc = cfg["trainer"]
    requested = {
        "pretrain": ("pretrain", "pretraining", cfg["pretrain"].name != "none"),
        "transfer.source": ("transfer", "transfer", cfg["transfer"].source is not None),
        "trainer.amp": ("amp", "mixed precision", tc.amp is True),
        "trainer.channels_last": ("channels_last", "channels-last", tc.channels_last is True),
        "trainer.compile": ("compile", "torch.compile", tc.compile),
        "trainer.diagnostics.every": ("diagnostics", "per-layer statistics", tc.diagnostics.every not in ("auto", 0)),
    }
    refusals = {key: f"{what}: {getattr(STACKED, feature)}" for key, (feature, what, on) in requested.items()
                if on and getattr(STACKED, feature) is not None}  # fmt: skip
    optimizer, architecture = optimizers.OPTIMIZERS[cfg["optimizer"].name], registry.MODELS[cfg["model"].name]
    if not optimizer.elementwise:
        refusals["optimizer"] = (
            f"optimizer={cfg['optimizer'].name}: its update is not elementwise and proportional to its rate, "
            "so one optimizer over the stacked members would not update each as its own would"
        )
    if architecture.members is not None:
        refusals["model"] = f"model={cfg['model'].name}: {architecture.members}"
    if (unit := activations.ACTIVATIONS[cfg["act"].name]).members is not None:
        refusals["act"] = f"act={cfg['act'].name}: {unit.members}"
    if cfg["mode"] != "train":
        refusals["mode"] = f"mode={cfg['mode']}: members are trained together, and the other modes use one model"
    for key, why in refusals.items():
        problems.add(
            key, f"trainer.seeds (members trained together) does not support {why}; or train the seeds as "
            f"separate runs: -m trainer.seed={','.join(map(str, tc.seeds))}"
        )  # fmt: skip
