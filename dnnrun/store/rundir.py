"""Every file a run or a sweep writes, known in one place.

A run directory (`RunDir`) holds the files of RUN_FILES below.

A sweep directory (`SweepDir`) holds its jobs' run directories, named N_OVERRIDES by the job
number N, and the files of SWEEP_FILES.

Files are written atomically (a temporary file, fsynced, renamed), so a crash leaves the old file
or the new one, never a torn one; JSON-lines files are appended to and read while being written.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dnnrun.errors import RunError, UserError
from dnnrun.training.metrics import maximized

TMP_MARK = ".tmp-"  # temporary files are named .NAME.tmp-PID until renamed

# Settings that never change what a run computes: where files are, how much is shown or recorded,
# on which device. A sweep job's directory name leaves them out (conf/config.yaml's exclude_keys,
# through the resolver in dnnrun/cli/conf.py), and a resume may change them
# (training/checkpointing.py's MAY_CHANGE_ON_RESUME). A key stands for the keys under it too. Here, not in config/,
# so that composing a config (which names directories) does not import torch.
RESULT_NEUTRAL = (
    "outputs",
    "data.root",
    "data.download",
    "trainer.resume",
    "trainer.force_resume",
    "trainer.progress",
    "trainer.threads",
    "trainer.device",
    "trainer.eval_batch_size",
    "trainer.detect_anomaly",
    "trainer.diagnostics",
    "trainer.channels_last",
    "trainer.compile",
    "logger",
)


# ---------------------------------------------------------------------------------------------
# Writing and reading files


def atomic_write(path: Path, write, before_rename=None) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync it, then rename.

    A crash leaves either the old file or the new one under `path`, never a torn one.
    `before_rename` (tests' fault injection) runs when the temporary file is complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only folder: the previous file stays as it was
        _discard(tmp)
        raise RunError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _discard(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. its folder could not be made: then there is no file either
        tmp.unlink(missing_ok=True)


def jsonable(x: Any) -> Any:
    """NaN and infinities are not JSON: they are written as null (a diverged loss stays visible as null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(jsonable(obj), indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object; None when it is missing or unreadable (a run that never got that far)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def append_jsonl(path: Path, record: dict, durable: bool = True) -> None:
    """One line, flushed (and with `durable`, fsynced): a reader never sees half a record except at
    the very end."""
    with open(path, "a") as f:
        f.write(json.dumps(jsonable(record)) + "\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())


def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(jsonable(r)) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; none when it does not exist (yet).

    A last line without its newline that does not parse is an append still being written (or cut
    short by a kill): it is left out. Any other line that does not parse is damage, and an error."""
    path = Path(path)
    if not path.exists():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail: after the last newline, b"" when the file ends with one
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
                why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
                raise UserError(f"{path}, line {number}: not a JSON record ({why}); the file is damaged") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except ValueError:
            pass  # a torn append: the writer had not finished the line
    return records


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# A run


# How a run that ended well says so in its status.json: a trial a search's pruner stopped is no
# failure (a sweep's end, a re-run that skips finished jobs and the report go by this).
ENDED_WELL = ("completed", "pruned")

# Every file of a run directory, with what it holds (the documentation's run-directory page is made from this).
RUN_FILES = (
    (".hydra/config.yaml, hydra.yaml, overrides.yaml", "the composed config, once the run owns the directory"),
    ("run.log", "the run's log"),
    ("summary.json", "how the run went: written when it starts and when it ends"),
    ("status.json", "how its process ended (status, exit code, job): the CLI's record, read by sweeps"),
    ("metrics.jsonl", "one JSON line per epoch"),
    ("diagnostics.jsonl", "per-layer statistics every trainer.diagnostics.every steps"),
    ("activations.json", "activation histograms at the start and the end of training"),
    ("checkpoints/last.pt", "where training goes on from (trainer.resume=auto)"),
    ("checkpoints/best.pt", "the epoch with the best trainer.monitor"),
    ("checkpoints/pretrained.pt", "the weights after pretraining"),
    ("plots/NAME.png", "drawn at the end of a run and by dnnrun-plot"),
    ("tensorboard/", "logger=tensorboard"),
    ("members/seed_N/", "trainer.seeds: each member's metrics, summary, checkpoints (and plots with plots=true)"),
    ("evaluation.json", "mode=evaluate"),
    ("lr_find.json, plots/lr_find.png", "mode=lr_find"),
    ("predictions.csv", "mode=predict"),
    (".owner", "the pid of the process that holds (or last held) the directory (RunDir.owned)"),
)
# A sweep directory's own files, beside its jobs' run directories.
SWEEP_FILES = (
    ("N_OVERRIDES/", "job N's run directory (its overrides in .hydra/overrides.yaml)"),
    ("N_rejected/", "job N, refused before it began: its status.json says why"),
    ("sweep.csv", "one row per job: status, exit code, epochs, best and test metrics, overrides"),
    ("multirun.yaml", "the sweep's config (Hydra's)"),
    ("optimization_results.yaml", "a search's best trial and how its trials ended"),
    ("optuna.journal", "a search's study, when no hydra.sweeper.storage is given"),
    ("report.md, report.csv, *.png", "dnnrun-report: the jobs ranked, and their figures"),
    (".sweep.lock", "held by the process that runs the sweep"),
)


class RunDir:
    """A run's directory and every file in it (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # Where each file lives
    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def diagnostics(self) -> Path:
        return self.path / "diagnostics.jsonl"

    @property
    def activations(self) -> Path:
        return self.path / "activations.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def pretrained(self) -> Path:
        return self.checkpoints / "pretrained.pt"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.json"

    @property
    def lr_find(self) -> Path:
        return self.path / "lr_find.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.path / ".hydra"

    def snapshot(self, name: str) -> Path:
        """The config snapshot's files: config, hydra, overrides."""
        return self.snapshot_dir / f"{name}.yaml"

    @property
    def owner(self) -> Path:
        return self.path / ".owner"

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """This process's hold on the directory, for all it does there: a second dnnrun (a second
        Enter, a re-run sweep, a requeued job whose first process still lives) is refused with a
        UserError naming the holder, and nothing of the first is touched. The lock is an flock on
        the directory itself, released by the kernel when the process ends, however it ends: a
        killed run never blocks its own resume. `.owner` says who holds it, for the message."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # a refused run beside this one removed the empty directory
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = f" (pid {int(self.owner.read_text())})"
                except (OSError, ValueError):
                    holder = ""  # it has the lock and has not written its pid yet
                raise UserError(
                    f"{self} is in use by another dnnrun process{holder}; wait for it to end, "
                    f"or choose another directory (hydra.run.dir=...)"
                ) from None
            try:
                self.owner.write_text(f"{os.getpid()}\n")
            except OSError as exc:  # a full or read-only disk: the run could not write anything either
                raise RunError(f"cannot write {self.owner}: {exc.strerror or exc}") from exc
            try:
                yield
            finally:
                self.owner.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def in_use(self) -> bool:
        """Whether a process holds the directory now (owned(): another process of a search that
        shares the sweep directory, say)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # closing the descriptor releases it
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # What a directory holds
    def holds_run(self) -> list[str]:
        """The files that show another run used this directory (a fresh run must not overwrite them)."""
        return [p.name for p in (self.summary, self.status, self.checkpoints) if p.exists()]

    def is_run(self) -> bool:
        return any(p.exists() for p in (self.snapshot_dir, self.summary, self.status, self.metrics))

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files left by a process killed while writing (never a finished file)."""
        stale = [p for p in self.path.rglob(f".*{TMP_MARK}*") if p.is_file()]
        for p in stale:
            p.unlink()
        return stale

    def remove_if_empty(self, up_to: Path) -> None:
        """Remove this directory if it is empty, and the folders above it (outputs/<date>/) while
        they are empty, up to but not including `up_to`. Another run may begin in one of them
        meanwhile: a folder that is not empty stays. This process's own `.owner` does not count."""
        if not self.path.is_dir() or any(p != self.owner for p in self.path.iterdir()):
            return
        self.owner.unlink(missing_ok=True)
        self.path.rmdir()
        top, path = Path(up_to).expanduser().resolve(), self.path.resolve().parent
        while path != top and path.is_relative_to(top):
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    # Reading and writing
    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status)

    def write_status(self, status: str, exit_code: int, job: dict[str, Any], error: str | None = None) -> None:
        record = {"status": status, "exit_code": exit_code, "job": job, "finished": now()}
        if error:
            record["error"] = error
        write_json(self.status, record)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def append_metrics(self, record: dict, durable: bool = True) -> None:
        append_jsonl(self.metrics, record, durable)

    def rewrite_metrics(self, records: list[dict]) -> None:
        """On resume: exactly the epochs of the checkpoint the run continues from."""
        write_jsonl(self.metrics, records)

    def read_diagnostics(self) -> list[dict]:
        return read_jsonl(self.diagnostics)

    def append_diagnostics(self, entry: dict) -> None:
        append_jsonl(self.diagnostics, entry, durable=False)  # statistics: cheap to lose in a crash

    def truncate_diagnostics(self, last_step: int) -> None:
        """On resume: drop records after the checkpoint, which the resumed run will write again."""
        write_jsonl(self.diagnostics, [r for r in self.read_diagnostics() if r["step"] <= last_step])

    def read_activations(self) -> dict[str, Any]:
        return read_json(self.activations) or {}

    def write_activations(self, snapshots: dict[str, Any]) -> None:
        write_json(self.activations, snapshots)

    def write_evaluation(self, result: dict[str, Any]) -> None:
        write_json(self.evaluation, result)

    def write_lr_find(self, result: dict[str, Any]) -> None:
        write_json(self.lr_find, result)

    def overrides(self) -> dict[str, str]:
        """The command-line overrides of a run, {"optimizer": "adam", "optimizer.lr": "0.01"}: from its
        config snapshot, or from its status.json when it was refused before one was written."""
        import yaml

        path = self.snapshot("overrides")
        if path.exists():
            items = yaml.safe_load(path.read_text())
        else:
            items = ((self.read_status() or {}).get("job") or {}).get("overrides", [])
        pairs = (item.split("=", 1) for item in items or [] if "=" in item)
        return {key.lstrip("+~"): value for key, value in pairs if not key.startswith("hydra")}

    def read(self) -> dict[str, Any]:
        """What a report needs from a run, finished or not: status, overrides, best and test metrics."""
        summary = self.read_summary() or {}
        final_status = self.read_status() or {}
        history = self.read_metrics()
        monitor = summary.get("best", {}).get("monitor", "val/loss")
        best = summary.get("best") or {}
        if not best.get("epoch") and history:  # a run still going (or stopped early): best so far
            pick = max if maximized(monitor) else min
            best = pick(history, key=lambda r: r.get(monitor) if r.get(monitor) is not None else float("inf"))
        test = summary.get("test") or {}
        return {
            "run_dir": str(self.path),
            "name": self.path.name,
            "status": final_status.get("status") or summary.get("status") or ("running" if history else "unknown"),
            "exit_code": final_status.get("exit_code"),
            "error": final_status.get("error") or summary.get("error"),
            "overrides": self.overrides(),
            "monitor": monitor,
            "epochs": len(history),
            "best_epoch": best.get("epoch"),
            "val/loss": best.get("val/loss"),
            "val/acc": best.get("val/acc"),
            "test/loss": test.get("test/loss"),
            "test/acc": test.get("test/acc"),
            "time_s": summary.get("wall_time_s") or sum(r.get("time/epoch_s", 0) for r in history),
            "history": history,
        }


# ---------------------------------------------------------------------------------------------
# A sweep


class SweepDir:
    """A sweep's directory: its jobs' run directories and sweep.csv."""

    TABLE_COLUMNS = (
        "job",
        "status",
        "exit_code",
        "epochs",
        "best_epoch",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "time_s",
        "overrides",
        "error",
        "run_dir",
    )

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def table(self) -> Path:
        return self.path / "sweep.csv"

    @property
    def lock(self) -> Path:
        return self.path / ".sweep.lock"

    def rejected(self, job: int) -> RunDir:
        """Where a job refused before it began records why (its own directory stays as it was)."""
        return RunDir(self.path / f"{job}_rejected")

    def jobs(self) -> list[RunDir]:
        """The job directories, by job number (their names start with it)."""
        dirs = [RunDir(p) for p in self.path.iterdir() if p.is_dir()] if self.path.is_dir() else []

        def number(run: RunDir) -> tuple[int, str]:
            head = run.path.name.split("_", 1)[0]
            return (int(head), run.path.name) if head.isdigit() else (1 << 30, run.path.name)

        return sorted((run for run in dirs if run.is_run()), key=number)

    def update_table(self) -> list[dict[str, Any]]:
        """Rewrite sweep.csv from the job directories (under a lock, atomically); its rows."""
        rows = []
        for job in self.jobs():
            run = job.read()
            row = {key: run.get(key) for key in self.TABLE_COLUMNS}
            row["job"] = job.path.name.split("_", 1)[0]
            row["overrides"] = " ".join(f"{k}={v}" for k, v in run["overrides"].items())
            rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        with _locked(self.lock):
            atomic_write(self.table, lambda f: f.write(text.getvalue().encode()))
        return rows


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between the jobs of a sweep that finish at the same time."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
