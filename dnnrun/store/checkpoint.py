"""Checkpoints as plain data: named state dicts, the config as a plain container, the counters and
every RNG state. Written atomically; read only with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import random
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnnrun.errors import UserError
from dnnrun.store.rundir import atomic_write
from dnnrun.training.state import TrainState

FORMAT = "dnnrun-checkpoint"
VERSION = 1
WEIGHTS_FORMAT = "dnnrun-weights"  # safetensors files written by dnnrun-export
INPUTS_PREFIX = "__inputs__."  # an export's preprocessing tensors (no module of a model is named so)


def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    return buffer.getvalue()


def save(path: Path, state: dict[str, Any], before_rename=None) -> None:
    blob = serialize(state)
    atomic_write(path, lambda f: f.write(blob), before_rename)


def load(path: Path, map_location: str | torch.device = "cpu", training: bool = False) -> dict[str, Any]:
    """A dnnrun checkpoint (.pt, read with weights_only=True, never without) or exported weights
    (.safetensors, which hold tensors and strings only), checked to hold what its reader uses: the
    model's tensors and the config, and with training=True (resuming) also the optimizer, schedule,
    counters and RNG states."""
    path = Path(path)
    state = _load_safetensors(path, map_location) if path.suffix == ".safetensors" else _load_pt(path, map_location)
    if training and not any(key in state for key in TRAINING):
        raise UserError(
            f"{path} holds weights only (a model and its config); resuming needs a training "
            f"checkpoint such as a run's checkpoints/last.pt"
        )
    problem = _problem(state, {**WEIGHTS, **(TRAINING if training else {})}, "")
    if problem:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {problem}")
    return state


def _load_pt(path: Path, map_location) -> dict[str, Any]:
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
        raise UserError(
            f"cannot read checkpoint {path}: the file is damaged or not a checkpoint ({_first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dnnrun checkpoint")
    return state


def _entries(cls: type) -> dict[str, Any]:
    """What a checkpoint entry written from dataclass `cls` must hold: each field's types, a nested
    dataclass as a dict of its own (optional when the field may be None)."""
    spec = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        nested = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if nested is not None:
            spec[name] = OptionalEntry(_entries(nested)) if type(None) in args else _entries(nested)
        else:
            allowed = [t for a in args for t in ((int, float) if a is float else (typing.get_origin(a) or a,))]
            spec[name] = tuple(dict.fromkeys(allowed))
    return spec


@dataclasses.dataclass(frozen=True)
class OptionalEntry:
    """An entry that may be missing or None, and is checked against `spec` when it is there."""

    spec: dict[str, Any]


# What readers take from a checkpoint: a key's type, or a dict of the keys it must hold in turn.
# resume.Checkpoints writes and reads them ("scaler" is optional and read with .get). A tuple
# lists the types allowed. The trainer's entry is TrainState's, derived from its fields.
# inputs: data.Preprocess.to_dict(), what applying the model to new inputs needs (checkpoints before it lack it)
INPUTS = {
    "scaling": str,
    "max_value": (int, float),
    "mean": (torch.Tensor, type(None)),
    "std": (torch.Tensor, type(None)),
    "shape": list,
    "class_names": list,
}
WEIGHTS: dict[str, Any] = {
    "model": dict,
    "config": dict,  # model: parameter name -> tensor, checked apart
    "inputs": OptionalEntry(INPUTS),
}
TRAINING: dict[str, Any] = {
    "optimizer": {"state": dict, "param_groups": list},  # torch.optim.Optimizer.state_dict()
    "schedule": {"t": int, "base_lrs": list, "total": int},  # schedules.Schedule.state_dict()
    "trainer": _entries(TrainState),
    "rng": {
        "torch": torch.Tensor,
        "cuda": list,
        "shuffle": torch.Tensor,
        "python": tuple,  # rng_state()
        "numpy": {"keys": torch.Tensor, "pos": int, "has_gauss": int, "gauss": float},
    },
}


def _problem(value: Any, spec: dict[str, Any], where: str) -> str | None:
    """What is missing or of the wrong type in `value` against `spec` (the first problem), or None."""
    for key, want in spec.items():
        name = f"{where}.{key}" if where else key
        if isinstance(want, OptionalEntry):
            if value.get(key) is None:
                continue
            want = want.spec
        if key not in value:
            return f"it has no '{name}' entry"
        allowed = dict if isinstance(want, dict) else want
        if not isinstance(value[key], allowed):
            expected = " or ".join(t.__name__ for t in (allowed if isinstance(allowed, tuple) else (allowed,)))
            return f"'{name}' is {_value_text(value[key])}, expected {expected}"
        if isinstance(want, dict) and (problem := _problem(value[key], want, name)):
            return problem
    if not where and "model" in spec:
        if not value["model"]:
            return "'model' holds no tensors"
        bad = next(
            (k for k, t in value["model"].items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)), None
        )
        if bad is not None:
            return (
                f"'model' must map parameter names to tensors, but '{bad}' maps to {_value_text(value['model'][bad])}"
            )
    if "rng" in spec:  # CPU generator states: bytes, as many as torch.get_rng_state() has
        size = torch.get_rng_state().numel()
        for key in ("torch", "shuffle"):
            t = value["rng"][key]
            if t.dtype != torch.uint8 or t.numel() != size:
                return (
                    f"'rng.{key}' is a {t.dtype} tensor of {t.numel()} elements, expected a CPU generator state "
                    f"({size} torch.uint8)"
                )
    return None


def _value_text(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 40 else text[:37] + '...'})"


def load_into(target: Any, state: dict[str, Any], path: Path, what: str = "model") -> None:
    """`target.load_state_dict(state)` for a module, optimizer or schedule, with `state` from the
    checkpoint at `path`; one that does not fit raises UserError naming the first mismatch."""
    if isinstance(target, torch.nn.Module):
        check_fits(target, state, path)
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        _refuse(path, what, [_first_line(exc)])


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse (UserError, the first mismatch named) weights whose keys or shapes differ from the
    module's; the module may live on the meta device, holding shapes only."""
    problems = _mismatches(module, state)
    if problems:
        _refuse(path, "model", problems)


def _refuse(path: Path, what: str, problems: list[str]) -> None:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserError(f"{path} does not fit this {what}: {problems[0]}{more}")


def _mismatches(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys and shapes that differ between the module's state dict and `state`, in the module's order."""
    own = module.state_dict()
    found = []
    for name, tensor in own.items():
        if name not in state:
            found.append(f"{name} is missing from the checkpoint")
        elif state[name].shape != tensor.shape:
            found.append(f"size mismatch for {name}: checkpoint {list(state[name].shape)}, model {list(tensor.shape)}")
    return found + [f"{name} is in the checkpoint but not in the model" for name in state if name not in own]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def export_safetensors(checkpoint_path: Path, out: Path) -> Path:
    """The model's weights and the run's config, as safetensors (no code can hide in it)."""
    from safetensors.torch import save

    state = load(checkpoint_path)
    tensors = {name: t.contiguous() for name, t in state["model"].items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(state["config"])}
    if state.get("inputs") is not None:  # the preprocessing: its tensors beside the weights, the rest as JSON
        inputs = dict(state["inputs"])
        for key in ("mean", "std"):
            if (t := inputs.pop(key)) is not None:
                tensors[f"{INPUTS_PREFIX}{key}"] = t.contiguous()
        metadata["inputs"] = json.dumps(inputs)
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
    if "config" not in metadata:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: its metadata has no 'config' entry")
    try:
        config = json.loads(metadata["config"])
    except ValueError as exc:
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: its metadata 'config' is not valid JSON ({_first_line(exc)})"
        ) from None
    inputs = None
    if "inputs" in metadata:
        inputs = {**json.loads(metadata["inputs"]), "mean": None, "std": None}
        for key in ("mean", "std"):
            inputs[key] = tensors.pop(f"{INPUTS_PREFIX}{key}", None)
    return {"format": FORMAT, "model": tensors, "config": config, "inputs": inputs}


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from, as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": shuffle.get_state(),
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }


def restore_rng(state: dict[str, Any], shuffle: torch.Generator) -> None:
    """Every stream rng_state() saved; `state` has the keys load(training=True) checks, but their
    contents can still be wrong (a generator state of another length, a short Mersenne Twister key)."""
    try:  # .cpu(): generator states are CPU tensors, but load(map_location="cuda") moves every tensor
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        shuffle.set_state(state["shuffle"].cpu())
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(
            f"the checkpoint's random number generator states cannot be restored: {_first_line(exc)}"
        ) from None
