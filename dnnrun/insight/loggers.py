"""Where metrics go besides metrics.jsonl and diagnostics.jsonl: `logger=tensorboard` adds
TensorBoard event files under the run directory (`tensorboard --logdir outputs`), and at the end
the run's options and key values as hparams with its final, best and test metrics (the HParams tab
compares the runs of a sweep)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from dnnrun.config.schema import Choice, Problems, flatten, parse_choice
from dnnrun.errors import UserError
from dnnrun.training.callbacks import Callback

if TYPE_CHECKING:
    from torch import nn

    from dnnrun.config.run_config import RunConfig
    from dnnrun.store.rundir import RunDir

# The groups whose every value is a hyperparameter (the trainer's are picked in TRAINER_HPARAMS);
# data, paths and modes stay out: they would add columns that rarely differ within a sweep.
HPARAM_GROUPS = ("model", "init", "act", "norm", "optimizer", "schedule", "regularizer")
TRAINER_HPARAMS = ("epochs", "batch_size", "seed", "clip_value", "clip_norm", "amp")


class NoLogger:
    def __init__(self, run_dir: RunDir):
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        pass

    def diagnostics(self, entry: dict[str, Any], model: nn.Module) -> None:
        pass

    def summary(self, cfg: RunConfig, summary: dict[str, Any]) -> None:
        """Once, at the end of the run, with the summary complete (final, best and test metrics)."""

    def close(self) -> None:
        pass


class TensorBoard(NoLogger):
    """Scalars for every epoch metric and per-layer statistic; weight and gradient histograms at
    the monitored steps (trainer.diagnostics.every)."""

    def __init__(self, run_dir: RunDir, histograms: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                'logger=tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard))
        self.histograms = histograms

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch's metrics, or the test metrics at the end (a record without "epoch")."""
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def diagnostics(self, entry: dict[str, Any], model: nn.Module) -> None:
        step = entry["step"]
        for layer, stats in entry["layers"].items():
            for key, value in stats.items():
                if value is not None:
                    self.writer.add_scalar(f"diagnostics/{layer}/{key}", value, step)
        if self.histograms:
            for name, p in model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
                if p.grad is not None:
                    self.writer.add_histogram(f"gradients/{name}", p.grad.detach().float().cpu(), step)

    def summary(self, cfg: RunConfig, summary: dict[str, Any]) -> None:
        # run_name="." puts the hparams in this run's own folder (add_hparams would otherwise make a
        # timestamped sub-run), so that TensorBoard shows them as one run with the scalars.
        self.writer.add_hparams(hparams(cfg), summary_metrics(summary), run_name=".", global_step=summary.get("steps"))

    def close(self) -> None:
        self.writer.close()


def hparams(cfg: RunConfig) -> dict[str, int | float | str | bool]:
    """The option of every group (`init: he_normal`, `regularizer: [l2,dropout]`) and the values of
    the hyperparameter groups with dotted keys (`optimizer.lr`, `model.hidden: "[300, 100]"`).
    Lists become JSON strings; None is dropped (TensorBoard takes only int, float, str and bool)."""
    values = {group: cfg.raw.get(group) or {} for group in HPARAM_GROUPS}
    values["trainer"] = {k: cfg.raw["trainer"].get(k) for k in TRAINER_HPARAMS}
    flat = {k: v for k, v in flatten(values).items() if k.rsplit(".", 1)[-1] not in ("option", "name")}
    return {
        **cfg.choices(),
        **{
            k: json.dumps(v) if isinstance(v, (list, tuple)) else v
            for k, v in flat.items()
            if isinstance(v, (int, float, str, bool, list, tuple))
        },
    }


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The HParams tab's metric columns. Their tags start with `hparams/`: add_hparams also writes
    each metric as a scalar, which under the epoch metrics' own tags (`val/loss`) would add a point
    to their curves."""
    best, final = summary.get("best") or {}, summary.get("final") or {}
    found = {f"hparams/best/{best.get('monitor')}": best.get("value"), "hparams/best/epoch": best.get("epoch")}
    found.update({f"hparams/final/{k}": final.get(k) for k in ("train/loss", "train/acc", "val/loss", "val/acc")})
    found.update({f"hparams/{k}": (summary.get("test") or {}).get(k) for k in ("test/loss", "test/acc")})
    return {
        k: float(v)
        for k, v in found.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


LOGGERS = {"none": NoLogger, "tensorboard": TensorBoard}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    return parse_choice(raw, LOGGERS, key, "logger", problems)


def build(choice: Choice, run_dir: RunDir) -> NoLogger:
    return LOGGERS[choice.name](run_dir, **choice.params)


class Loggers(Callback):
    """The loop's loggers: one per member, in the member's run directory (a single run's own)."""

    def __init__(self, choice: Choice, dirs: list[RunDir]):
        self.each = [build(choice, d) for d in dirs]

    def epoch_end(self, loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        for k, record in records.items():
            self.each[k].epoch(record)

    def finish(self, k: int, cfg: RunConfig, summary: dict[str, Any]) -> None:
        """Member k's end: its test metrics (when it was tested) and the summary's hparams."""
        test = summary.get("test")
        if test:
            self.each[k].epoch({"step": summary["steps"], "test/loss": test["test/loss"], "test/acc": test["test/acc"]})
        self.each[k].summary(cfg, summary)  # TensorBoard's hparams: the options with the final, best, test metrics
        self.each[k].close()
