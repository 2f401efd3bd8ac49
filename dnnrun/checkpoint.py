"""Checkpoints as plain data: named state dicts, the config as a plain container, the counters and
every RNG state. Written atomically; read only with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnnrun.errors import RunError, UserError

FORMAT = "dnnrun-checkpoint"
VERSION = 1
WEIGHTS_FORMAT = "dnnrun-weights"  # safetensors files written by dnnrun-export
TMP_MARK = ".tmp-"  # temporary files are named .NAME.tmp-PID until renamed


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files left by a process killed while writing (never a finished file)."""
    stale = [p for p in Path(run_dir).rglob(f".*{TMP_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write(path: Path, write, before_rename=None) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync it, then rename.

    A crash leaves either the old file or the new one under `path`, never a torn one.
    `before_rename` (tests' fault injection) runs when the temporary file is complete.
    """
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


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    return buffer.getvalue()


def save(path: Path, state: dict[str, Any], before_rename=None) -> None:
    blob = serialize(state)
    atomic_write(path, lambda f: f.write(blob), before_rename)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A dnnrun checkpoint (.pt, read with weights_only=True, never without) or exported weights
    (.safetensors, which hold tensors and strings only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UserError(
                f"refused to load {path}: it holds Python objects besides tensors and plain data, and unpickling "
                f"them could run code. dnnrun reads checkpoints with torch.load(weights_only=True) only."
            ) from None
        raise UserError(f"cannot read checkpoint {path}: the file is damaged ({_first_line(exc)})") from None
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: the file is damaged or not a checkpoint "
                        f"({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dnnrun checkpoint")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def export_safetensors(checkpoint_path: Path, out: Path) -> Path:
    """The model's weights and the run's config, as safetensors (no code can hide in it)."""
    from safetensors.torch import save

    state = load(checkpoint_path)
    tensors = {name: t.contiguous() for name, t in state["model"].items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(state["config"])}
    atomic_write(Path(out), lambda f: f.write(save(tensors, metadata)))
    return Path(out)



def _load_safetensors(path: Path, map_location) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: the file is damaged ({_first_line(exc)})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise UserError(f"{path} holds no dnnrun weights (exported with dnnrun-export)")
    return {"format": FORMAT, "model": tensors, "config": json.loads(metadata["config"])}


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

