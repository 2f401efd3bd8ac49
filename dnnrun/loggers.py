"""Where metrics go besides metrics.jsonl and diagnostics.jsonl: `logger=tensorboard` adds
TensorBoard event files under the run directory (`tensorboard --logdir outputs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dnnrun.errors import UserError
from dnnrun.schema import Choice, Problems, parse_choice

if TYPE_CHECKING:
    from torch import nn

    from dnnrun.rundir import RunDir


class NoLogger:
    def __init__(self, run_dir: RunDir):
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        pass

    def diagnostics(self, entry: dict[str, Any], model: nn.Module) -> None:
        pass

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
                "logger=tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\""
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

    def close(self) -> None:
        self.writer.close()


LOGGERS = {"none": NoLogger, "tensorboard": TensorBoard}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    return parse_choice(raw, LOGGERS, key, "logger", problems)


def build(choice: Choice, run_dir: RunDir) -> NoLogger:
    return LOGGERS[choice.name](run_dir, **choice.params)
