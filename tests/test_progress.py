"""The live progress display (console.EpochBar): on a terminal one bar, reset each epoch, with the time
left for the epoch and the run, above which each finished epoch's log line is printed once; off
the terminal, or with trainer.progress=false, no bar at all. The terminal's output is replayed on a
small emulator of the control codes Rich writes, so that what a user sees at each redraw is checked."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.logging import RichHandler

from conftest import make_config
from dnnrun.insight import console as console_module
from dnnrun.insight.console import EpochBar, Running, time_left
from dnnrun.training import loop

BAR = re.compile(r"^epoch (\d+)/(\d+) .*\d+/\d+ +(\d+:\d\d:\d\d|-:--:--) left")  # the bar's line
STATS = re.compile(r"loss (\d+\.\d{4}|-) +([\d,]+|-) samples/s +run (\d+:\d\d:\d\d|-:--:--) left")
LOGGED = re.compile(r"epoch (\d+)/(\d+)  train/loss \d+\.\d{4}  train/acc")  # the loop's line per epoch
CLOCK = re.compile(r"\d+:\d\d:\d\d")


class Writes(io.StringIO):
    """A console's file that keeps each write apart: one redraw of the live display is one write."""

    encoding = "utf-8"

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


class Screen:
    """What a terminal shows (all of it, scrolled-off lines too) after the text and the control
    codes that Rich's live display writes: \\r, \\n, cursor up, erase line; colours and cursor
    visibility change nothing here. Any other control code fails the test."""

    TOKEN = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)")

    def __init__(self):
        self.lines, self.row, self.col = [""], 0, 0

    def feed(self, text: str) -> None:
        for token in filter(None, self.TOKEN.split(text)):
            if token == "\n":
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.lines):
                    self.lines.append("")
            elif token == "\r":
                self.col = 0
            elif token.startswith("\x1b["):
                arg, code = token[2:-1], token[-1]
                if code == "A":
                    self.row = max(self.row - int(arg or 1), 0)
                elif code == "K" and arg == "2":
                    self.lines[self.row] = ""
                elif code == "K" and arg in ("", "0"):
                    self.lines[self.row] = self.lines[self.row][: self.col]
                elif not (code == "m" or token in ("\x1b[?25l", "\x1b[?25h")):
                    raise AssertionError(f"unexpected control code {token!r}")
            else:
                line = self.lines[self.row].ljust(self.col)
                self.lines[self.row] = line[: self.col] + token + line[self.col + len(token) :]
                self.col += len(token)

    def shown(self) -> list[str]:
        return [line.rstrip() for line in self.lines if line.strip()]


def replay(chunks: list[str]) -> list[list[str]]:
    """The screen after each write."""
    screen, states = Screen(), []
    for chunk in chunks:
        screen.feed(chunk)
        states.append(screen.shown())
    return states


@pytest.fixture
def terminal(monkeypatch):
    """A console like the CLI's, made a terminal (or not) of a given width, 20 rows high, with
    dnnrun's log lines on it as the CLI puts them (cli.app._log_to); returns its file."""

    def make(width: int, is_terminal: bool = True) -> Writes:
        monkeypatch.setenv("TERM", "xterm-256color")  # not "dumb", which gets no live display
        out = Writes()
        term = Console(file=out, force_terminal=is_terminal, width=width, height=20)
        monkeypatch.setattr(console_module, "console", term)
        monkeypatch.setattr(loop, "console", term, raising=False)  # the results table
        handler = RichHandler(console=term, show_path=False, show_time=False, markup=False)
        logging.getLogger("dnnrun").addHandler(handler)
        handlers.append(handler)
        return out

    handlers: list[logging.Handler] = []
    yield make
    for handler in handlers:
        logging.getLogger("dnnrun").removeHandler(handler)


def test_time_left_for_the_epoch_and_the_run():
    # epoch 1 of 3, 4 of 10 steps in 2 s: 3 s left in it, the two others as long as it (5 s each)
    assert time_left(10, 4, 4, 2.0, 2, []) == (3.0, 13.0)
    # once epochs have ended, the run is estimated from their mean (7 s), validation included
    assert time_left(10, 4, 4, 2.0, 2, [6.0, 8.0]) == (3.0, 17.0)
    # no step taken yet in this epoch: it counts as a whole one
    assert time_left(10, 0, 0, 0.1, 2, [6.0, 8.0]) == (None, 21.0)
    assert time_left(10, 0, 0, 0.1, 2, []) == (None, None)
    # a resumed epoch (4 steps done before): the rate is this process's, 2 steps in 1 s
    assert time_left(10, 6, 2, 1.0, 1, []) == (2.0, 7.0)


@pytest.mark.parametrize("width, lines", [(120, 1), (80, 2)])
def test_terminal_shows_one_bar_with_time_left_and_each_epoch_logged_once(
    run_dir: Path, terminal, monkeypatch, width, lines
):
    out = terminal(width)
    monkeypatch.setattr(console_module, "REFRESH_S", 0.0)  # redraw at every step: each state is seen
    loop.run(make_config("trainer.epochs=3", "trainer.progress=true"), run_dir)
    states = replay(out.chunks)

    bars = [[i for i, line in enumerate(state) if BAR.match(line)] for state in states]
    assert max(len(b) for b in bars) == 1  # one bar, never a second one left behind by an epoch
    assert max(sum(bool(STATS.search(line)) for line in state) for state in states) == 1
    with_bar = [(state, b[0]) for state, b in zip(states, bars) if b]
    assert {BAR.match(state[row]).group(1) for state, row in with_bar} == {"1", "2", "3"}
    for state, row in with_bar:
        display = state[row:]  # the live display is the last thing on the screen ...
        assert len(display) == lines and all(len(line) <= width for line in display)  # ... and 1-2 lines high
        assert STATS.search(display[-1])
    # the time left appears, for the run too, already while the first epoch runs
    first = [STATS.search(state[row + lines - 1]) for state, row in with_bar if BAR.match(state[row]).group(1) == "1"]
    assert any(CLOCK.fullmatch(s.group(3)) and s.group(1) != "-" and s.group(2) != "-" for s in first)
    assert any(CLOCK.fullmatch(BAR.match(state[row]).group(3)) for state, row in with_bar)

    final = states[-1]
    assert not any(BAR.match(line) or STATS.search(line) for line in final)  # the bar is gone at the end
    assert [LOGGED.search(line).group(1) for line in final if LOGGED.search(line)] == ["1", "2", "3"]


def test_bar_is_reset_not_added_each_epoch(terminal):
    terminal(80)
    bar = EpochBar(True, epochs=3)
    with bar:
        for epoch in (1, 2, 3):
            progress = Running()
            bar.start_epoch(epoch, 5, progress)
            for _ in range(5):
                progress.batches, progress.seen, progress.loss_sum = progress.batches + 1, progress.seen + 4, 1.0
                bar.step(progress)
            bar.end_epoch(progress)
            assert len(bar.progress.tasks) == 1 and bar.progress.tasks[0].description == f"epoch {epoch}/3"
            assert bar.progress.tasks[0].completed == 5
        assert len(bar.epoch_s) == 2  # epochs 1 and 2, measured at the starts of 2 and 3


@pytest.mark.parametrize(
    "is_terminal, progress", [(False, "true"), (True, "false")], ids=["not-a-terminal", "progress-false"]
)
def test_no_bar_off_the_terminal_or_when_disabled(run_dir: Path, terminal, is_terminal, progress):
    out = terminal(120, is_terminal)
    loop.run(make_config("trainer.epochs=3", f"trainer.progress={progress}"), run_dir)
    text = out.getvalue()
    if not is_terminal:  # CI logs, pipes: plain lines, no control codes at all
        assert "\x1b[" not in text
    states = replay(out.chunks)
    assert not any(BAR.match(line) or STATS.search(line) for state in states for line in state)
    assert [LOGGED.search(line).group(1) for line in states[-1] if LOGGED.search(line)] == ["1", "2", "3"]
