"""What a run writes besides checkpoints: metrics.jsonl (one line per epoch) and summary.json."""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dnnrun.checkpoint import atomic_write
from dnnrun.errors import UserError


def maximized(metric: str) -> bool:
    """Accuracies improve upwards, losses downwards."""
    return metric.endswith("acc")


def better(metric: str, value: float, than: float, min_delta: float = 0.0) -> bool:
    """Whether `value` of `metric` improves on `than` by more than min_delta."""
    return value > than + min_delta if maximized(metric) else value < than - min_delta


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


class MetricsLog:
    """metrics.jsonl: appended and flushed after every epoch; rewritten whole on resume so that it
    holds exactly the epochs of the checkpoint the run continues from."""

    def __init__(self, path: Path):
        self.path = path

    def rewrite(self, records: list[dict]) -> None:
        text = "".join(json.dumps(jsonable(r)) + "\n" for r in records)
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


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


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("dnnrun", "hydra-core", "omegaconf", "numpy", "torchvision"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
