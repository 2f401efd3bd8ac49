"""The terminal: one Rich console for the progress bar, log lines and the results table."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from rich.columns import Columns
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from dnnrun.training.callbacks import Callback

if TYPE_CHECKING:
    from dnnrun.training.loop import Loop

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 120)  # logs and CI output: don't wrap log lines at 80 columns

REFRESH_S = 0.1  # seconds between redraws of the progress bar


@dataclasses.dataclass
class Running:
    """An epoch so far, as the bar shows it: steps taken, training examples seen, their summed loss
    (the members': their mean)."""

    batches: int = 0
    seen: int = 0
    loss_sum: float = 0.0


class EpochBar(Callback):
    """The live display of a run on a terminal: one bar, reset at each epoch's start, with the
    epoch's steps, its mean training loss so far, samples/s and the time left for the epoch and for
    the run. Each finished epoch is left behind only as its log line; the bar goes when the run
    ends. Off the terminal (CI logs, pipes) or with trainer.progress=false there is no bar at all.
    Cheap per step: it looks at the clock and redraws at most every REFRESH_S seconds, in the
    training thread (no refresh thread to compete with it for the GIL)."""

    def __init__(self, enabled: bool, epochs: int):
        self.shown = enabled and console.is_terminal and not console.is_dumb_terminal
        self.progress = _Display(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[epoch_left]} left"),
            console=console,
            auto_refresh=False,
            transient=True,  # the bar is gone at the end; the log lines stay
            disable=not self.shown,
        )
        self.epochs = epochs
        self.task = None
        self.epoch_s: list[float] = []  # how long each whole epoch run in this process took (validation included)
        self.started = None  # perf_counter() at the current epoch's start
        self.last = 0.0  # perf_counter() at the last redraw
        self.whole = False  # whether the current epoch started at its first step (not a resumed one)

    def __enter__(self) -> None:
        self.progress.start()

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    # As the loop's callback
    def train_start(self, loop: Loop) -> None:
        self.__enter__()

    def epoch_start(self, loop: Loop, epoch: int) -> None:
        self.start_epoch(epoch, loop.steps_per_epoch, loop.tally.running())

    def step_end(self, loop: Loop, step: int, epoch: int) -> None:
        if self.shown and time.perf_counter() - self.last >= REFRESH_S:  # reading the figures may wait for a GPU
            self._draw(loop.tally.running(), time.perf_counter())

    def epoch_end(self, loop: Loop, epoch: int, records: dict[int, dict[str, Any]]) -> None:
        self.end_epoch(loop.tally.running())

    def train_end(self, loop: Loop) -> None:
        self.__exit__()

    def start_epoch(self, epoch: int, steps: int, progress: Running) -> None:
        """An epoch of `steps` steps, `progress.batches` of them done before (a resumed epoch)."""
        now = time.perf_counter()
        if self.started is not None and self.whole:
            self.epoch_s.append(now - self.started)  # the previous epoch, from its start to this one's
        self.epoch, self.steps, self.whole = epoch, steps, progress.batches == 0
        self.started = self.last = now
        self.batches_before, self.seen_before = progress.batches, progress.seen
        if not self.shown:
            return
        fields = self._fields(progress, now)
        if self.task is None:
            self.task = self.progress.add_task(
                f"epoch {epoch}/{self.epochs}", total=steps, completed=progress.batches, **fields
            )
        else:  # the same bar, from the start: never more than one on the screen
            self.progress.reset(
                self.task, description=f"epoch {epoch}/{self.epochs}", total=steps, completed=progress.batches, **fields
            )

    def step(self, progress: Running) -> None:
        now = time.perf_counter()
        if now - self.last >= REFRESH_S and self.shown:
            self._draw(progress, now)

    def end_epoch(self, progress: Running) -> None:
        if self.shown:
            self._draw(progress, time.perf_counter())

    def _draw(self, progress: Running, now: float) -> None:
        self.last = now
        self.progress.update(self.task, completed=progress.batches, **self._fields(progress, now))
        self.progress.refresh()

    def _fields(self, progress: Running, now: float) -> dict[str, str]:
        elapsed = now - self.started
        done = progress.batches - self.batches_before  # steps taken in this process
        epoch_left, run_left = time_left(
            self.steps, progress.batches, done, elapsed, self.epochs - self.epoch, self.epoch_s
        )
        seen = progress.seen - self.seen_before
        loss = f"{progress.loss_sum / progress.seen:.4f}" if progress.seen else "-"
        rate = f"{seen / elapsed:,.0f}" if seen and elapsed > 0 else "-"
        return {
            "epoch_left": _clock(epoch_left),
            "stats": f"loss {loss}  {rate} samples/s  run {_clock(run_left)} left",
        }


def time_left(
    steps: int, batches: int, done: int, elapsed: float, epochs_after: int, epoch_s: list[float]
) -> tuple[float | None, float | None]:
    """Seconds left in an epoch of `steps` steps at `batches`, at the rate of the `done` steps this
    process took in `elapsed` seconds; and in the run: that plus `epochs_after` more epochs at the
    mean of `epoch_s` (the whole epochs so far) or, before one has ended, at this epoch's rate.
    None where nothing is known yet."""
    per_step = elapsed / done if done else None
    epoch_left = (steps - batches) * per_step if per_step is not None else None
    if epoch_s:
        per_epoch = sum(epoch_s) / len(epoch_s)
    elif per_step is not None:
        per_epoch = steps * per_step  # the training steps only: no validation pass measured yet
    else:
        return epoch_left, None
    if epoch_left is None:  # no step yet in this epoch: count it as a whole one
        return None, (epochs_after + 1) * per_epoch
    return epoch_left, epoch_left + epochs_after * per_epoch


class _Display(Progress):
    """The bar on one line with the loss, rate and the run's time left after it when the terminal
    is wide enough, else on a second line: the display is never more than two lines high."""

    def get_renderables(self):
        tasks = [task for task in self.tasks if task.visible]
        if tasks:
            yield Columns(
                [self.make_tasks_table(tasks), *(Text(task.fields["stats"]) for task in tasks)], padding=(0, 2)
            )


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def results_table(summary: dict) -> Table:
    table = Table(title=f"dnnrun: {summary['status']}", title_justify="left")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column(f"best (epoch {summary['best'].get('epoch', '-')})", justify="right")
    final, best = summary["final"], summary["best"]
    for name in ("train/loss", "train/acc", "train_eval/loss", "train_eval/acc", "val/loss", "val/acc"):
        if name in final or name in best:  # train_eval: with trainer.eval_train
            table.add_row(name, _fmt(final.get(name)), _fmt(best.get(name)))
    tested_best = summary["test"]["weights"] == "best"  # the column of the weights that were tested
    for name, value in summary["test"].items():
        if name.startswith("test/"):
            table.add_row(name, "" if tested_best else _fmt(value), _fmt(value) if tested_best else "")
    return table


def print_diagnosis(found: list[str]) -> None:
    """The end-of-run diagnosis, each finding with what to try (diagnosis.Finding.remedies); one
    line when nothing is wrong."""
    if not found:
        console.print(Text("(no diagnosis: nothing unusual was seen)", style="green"))
        return
    console.print(Text("diagnosis:", style="bold yellow"))
    for sentence in found:
        console.print(Text(f"  - {sentence}"), soft_wrap=True)
        remedies = getattr(sentence, "remedies", ())  # a plain str (the loop's "training diverged ...") has none
        if remedies:
            console.print(Text("    try: " + ", ".join(map(str, remedies))), soft_wrap=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
