"""Run and sweep directories as data: each job's status.json, reading a run back, and the
sweep-level table sweep.csv that every finishing job rewrites."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from dnnrun.checkpoint import atomic_write
from dnnrun.metrics import maximized, read_jsonl, write_json


def write_status(run_dir: Path, status: str, exit_code: int, job: dict[str, Any], error: str | None = None) -> None:
    record = {"status": status, "exit_code": exit_code, "job": job,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if error:
        record["error"] = error
    write_json(run_dir / "status.json", record)


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(run_dir: Path) -> dict[str, Any] | None:
    return _json(run_dir / "status.json")


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (".hydra", "summary.json", "status.json", "metrics.jsonl"))


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's job directories, by job number (their names start with it)."""
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and is_run_dir(p)] if sweep_dir.is_dir() else []

    def number(p: Path) -> tuple[int, str]:
        head = p.name.split("_", 1)[0]
        return (int(head), p.name) if head.isdigit() else (1 << 30, p.name)

    return sorted(dirs, key=number)


def overrides(run_dir: Path) -> dict[str, str]:
    """The command-line overrides of a run, {"optimizer": "adam", "optimizer.lr": "0.01"}: from its
    config snapshot, or from its status.json when it was refused before one was written."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        items = yaml.safe_load(path.read_text())
    else:
        items = ((status(run_dir) or {}).get("job") or {}).get("overrides", [])
    pairs = (item.split("=", 1) for item in items or [] if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs if not key.startswith("hydra")}


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a report needs from a run, finished or not: status, overrides, best and test metrics."""
    run_dir = Path(run_dir)
    summary = _json(run_dir / "summary.json") or {}
    final_status = status(run_dir) or {}
    history = read_jsonl(run_dir / "metrics.jsonl")
    monitor = summary.get("best", {}).get("monitor", "val/loss")
    best = summary.get("best") or {}
    if not best.get("epoch") and history:  # a run still going (or stopped early): best so far
        pick = max if maximized(monitor) else min
        best = pick(history, key=lambda r: r.get(monitor) if r.get(monitor) is not None else float("inf"))
    test = summary.get("test") or {}
    return {
        "run_dir": str(run_dir),
        "name": run_dir.name,
        "status": final_status.get("status") or summary.get("status") or ("running" if history else "unknown"),
        "exit_code": final_status.get("exit_code"),
        "error": final_status.get("error") or summary.get("error"),
        "overrides": overrides(run_dir),
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


TABLE_COLUMNS = ("job", "status", "exit_code", "epochs", "best_epoch", "val/loss", "val/acc", "test/loss",
                 "test/acc", "time_s", "overrides", "error", "run_dir")


def update_table(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rewrite SWEEP_DIR/sweep.csv from the job directories (under a lock, atomically)."""
    rows = []
    for job in job_dirs(sweep_dir):
        run = read_run(job)
        row = {key: run.get(key) for key in TABLE_COLUMNS}
        row["job"] = job.name.split("_", 1)[0]
        row["overrides"] = " ".join(f"{k}={v}" for k, v in run["overrides"].items())
        rows.append(row)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with _locked(sweep_dir / ".sweep.lock"):
        atomic_write(sweep_dir / "sweep.csv", lambda f: f.write(text.getvalue().encode()))
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
