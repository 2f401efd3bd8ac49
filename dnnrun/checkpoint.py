"""Checkpoints as plain data: named state dicts, the config as a plain container, the counters and
every RNG state. Written atomically; read only with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnnrun.errors import UserError

FORMAT = "dnnrun-checkpoint"
VERSION = 1


def atomic_write(path: Path, write, before_rename=None) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync it, then rename.

    A crash leaves either the old file or the new one under `path`, never a torn one.
    `before_rename` (tests' fault injection) runs when the temporary file is complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save(path: Path, state: dict[str, Any], before_rename=None) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f), before_rename)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dnnrun checkpoint")
    return state


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from, as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": shuffle.get_state(),
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }


def restore_rng(state: dict[str, Any], shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    shuffle.set_state(state["shuffle"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))

