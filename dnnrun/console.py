"""The terminal: one Rich console for the progress bar, log lines and the results table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from dnnrun.state import EpochProgress

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 120)  # logs and CI output: don't wrap log lines at 80 columns

REFRESH_S = 0.1  # seconds between redraws of the progress bar


class EpochBar:
    """A progress bar per epoch: step, the epoch's mean training loss so far and samples/s. Cheap
    per step: it looks at the clock and redraws at most every REFRESH_S seconds."""

    def __init__(self, enabled: bool, epochs: int):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not (enabled and console.is_terminal),
        )
        self.epochs = epochs
        self.task = None

    def __enter__(self) -> EpochBar:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start_epoch(self, epoch: int, steps: int, progress: EpochProgress) -> None:
        """An epoch of `steps` steps, `progress.batches` of them done before (a resumed epoch)."""
        self.task = self.progress.add_task(f"epoch {epoch}/{self.epochs}", total=steps, completed=progress.batches,
                                           loss="-", rate="-")
        self.started = self.last = time.perf_counter()
        self.seen_before = progress.seen

    def step(self, progress: EpochProgress) -> None:
        now = time.perf_counter()
        if now - self.last >= REFRESH_S:
            self._draw(progress, now)

    def end_epoch(self, progress: EpochProgress) -> None:
        self._draw(progress, time.perf_counter())

    def _draw(self, progress: EpochProgress, now: float) -> None:
        self.last = now
        rate = (progress.seen - self.seen_before) / max(now - self.started, 1e-9)
        loss = progress.loss_sum / max(progress.seen, 1)
        self.progress.update(self.task, completed=progress.batches, loss=f"{loss:.4f}", rate=f"{rate:,.0f}")


def results_table(summary: dict) -> Table:
    table = Table(title=f"dnnrun: {summary['status']}", title_justify="left")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column(f"best (epoch {summary['best'].get('epoch', '-')})", justify="right")
    final, best = summary["final"], summary["best"]
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        table.add_row(name, _fmt(final.get(name)), _fmt(best.get(name)))
    tested_best = summary["test"]["weights"] == "best"  # the column of the weights that were tested
    for name, value in summary["test"].items():
        if name.startswith("test/"):
            table.add_row(name, "" if tested_best else _fmt(value), _fmt(value) if tested_best else "")
    return table


def print_diagnosis(found: list[str]) -> None:
    """The end-of-run diagnosis; nothing is printed when nothing is wrong."""
    if found:
        console.print(Text("diagnosis:", style="bold yellow"))
        for sentence in found:
            console.print(Text(f"  - {sentence}"), soft_wrap=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
