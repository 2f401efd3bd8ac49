"""Checkpoints as plain data: named state dicts, the config as a plain container, the counters and
every RNG state. Written atomically; read only with `torch.load(..., weights_only=True)`.

One format for a single run and for the members of trainer.seeds (version 2):

    model, config, inputs     the weights (a members' run: each tensor stacked, (K, ...)), the config
                              as composed, the preprocessing: all that evaluate, predict, transfer and
                              export read (a weights-only file holds these alone)
    optimizer, schedule, scaler   the engine's state
    trainer                   the loop's TrainState: epochs, steps, each member's history and divergence,
                              where an epoch stopped (a checkpoint written in its middle)
    callbacks                 each callback's own state (early stopping, unfreezing, members' best weights)
    rng                       every random stream, a shuffle generator per member

Version 1 (before one loop served single runs and members) is read: a single run's training
checkpoint is upgraded on load, a members' one is refused with the reason.
"""

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
VERSION = 2
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
    counters, callbacks' states and RNG states."""
    path = Path(path)
    state = _load_safetensors(path, map_location) if path.suffix == ".safetensors" else _load_pt(path, map_location)
    version = state.get("version", VERSION)
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise UserError(
            f"{path} is a dnnrun checkpoint of version {version!r}; this dnnrun reads versions 1 to {VERSION} "
            "(a newer dnnrun wrote it: upgrade dnnrun)"
        )
    if isinstance(state.get("members"), list):  # version 1's own layout for trainer.seeds
        raise UserError(
            f"{path} holds the members of trainer.seeds as dnnrun wrote them before checkpoint version 2, "
            "which cannot be resumed or read as one model; train the members again, and read a member's "
            "weights from its own RUN/members/seed_N/checkpoints/best.pt"
        )
    if training and not any(key in state for key in TRAINING):
        raise UserError(
            f"{path} holds weights only (a model and its config); resuming needs a training "
            f"checkpoint such as a run's checkpoints/last.pt"
        )
    if training and version == 1:
        state = _upgrade_v1(state)
    problem = _problem(state, {**WEIGHTS, **(TRAINING if training else {})}, "")
    if problem:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {problem}")
    members = state.get("trainer", {}).get("members") if version > 1 else None
    if not training and isinstance(members, list) and len(members) > 1:
        raise UserError(
            f"{path} holds {len(members)} members trained together (trainer.seeds); read one member's "
            f"weights from its own directory: {path.parent.parent / 'members' / 'seed_N' / 'checkpoints' / 'best.pt'}"
        )
    return state


def _upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """A single run's version 1 training checkpoint as version 2: the early-stopping and transfer
    counters move from `trainer` to their callbacks' entries, the history into the run's only
    member, the shuffle generator into `rng` as the member's, the epoch's progress per member.
    Nothing is checked here: what is missing or mistyped is reported against version 2's entries."""
    state = dict(state)
    old = state.get("trainer")
    rng = state.get("rng")
    if not isinstance(old, dict) or not isinstance(rng, dict):
        return state
    seed = (state.get("config") or {}).get("trainer", {}).get("seed", 0)
    history = old.get("history", [])
    member = {"seed": seed, "epoch": old.get("epoch"), "step": old.get("step"),
              "history": json.dumps(history) if isinstance(history, list) else history,
              "diverged": None, "diverged_at": None}  # fmt: skip
    trainer = {"epoch": old.get("epoch"), "step": old.get("step"), "members": [member]}
    if isinstance(progress := old.get("progress"), dict):
        fields = ("shuffle_state", "loss_sum", "correct", "seen", "lr")
        trainer["progress"] = {"batches": progress.get("batches"), "members": [{k: progress.get(k) for k in fields}]}
    state["trainer"] = trainer
    state["callbacks"] = {
        "early_stopping": {"members": [{k: old.get(k) for k in ("best", "best_epoch", "bad_epochs")}]},
        "unfreezing": {k: old.get(k) for k in ("reused_layers", "reused", "unfrozen")},
    }
    state["rng"] = {**rng, "shuffle": [rng.get("shuffle")]}
    state["version"] = VERSION
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


def entries(cls: type) -> dict[str, Any]:
    """What a checkpoint entry written from dataclass `cls` must hold: each field's types (or its
    metadata's `stored_as`), a nested dataclass as a dict of its own (optional when the field may
    be None), a list of dataclasses as a list of such dicts."""
    spec = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        nested = next((a for a in args if dataclasses.is_dataclass(a)), None)
        items = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if typing.get_origin(tp) is list else []
        if "stored_as" in fields[name].metadata:
            spec[name] = fields[name].metadata["stored_as"]
        elif items:
            spec[name] = ListOf(entries(items[0]))
        elif nested is not None:
            spec[name] = OptionalEntry(entries(nested)) if type(None) in args else entries(nested)
        else:
            allowed = [t for a in args for t in ((int, float) if a is float else (typing.get_origin(a) or a,))]
            spec[name] = tuple(dict.fromkeys(allowed))
    return spec


@dataclasses.dataclass(frozen=True)
class OptionalEntry:
    """An entry that may be missing or None, and is checked against `spec` when it is there."""

    spec: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A list whose every item is a dict checked against `spec`."""

    spec: dict[str, Any]


# What readers take from a checkpoint: a key's type, or a dict of the keys it must hold in turn.
# training/checkpointing.py writes and reads them ("scaler" is optional and read with .get). A tuple
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
    "trainer": entries(TrainState),
    "callbacks": dict,  # each callback checks its own entry (check_entry) as it loads it
    "rng": {
        "torch": torch.Tensor,
        "cuda": list,
        "shuffle": list,  # one generator state per member
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
        allowed = dict if isinstance(want, dict) else list if isinstance(want, ListOf) else want
        if not isinstance(value[key], allowed):
            expected = " or ".join(t.__name__ for t in (allowed if isinstance(allowed, tuple) else (allowed,)))
            return f"'{name}' is {_value_text(value[key])}, expected {expected}"
        if isinstance(want, dict) and (problem := _problem(value[key], want, name)):
            return problem
        if isinstance(want, ListOf):
            for i, item in enumerate(value[key]):
                if not isinstance(item, dict):
                    return f"'{name}[{i}]' is {_value_text(item)}, expected dict"
                if problem := _problem(item, want.spec, f"{name}[{i}]"):
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
        shuffles, members = value["rng"]["shuffle"], value["trainer"]["members"]
        if len(shuffles) != len(members):
            return f"'rng.shuffle' holds {len(shuffles)} generator states for {len(members)} members"
        for key, t in [("torch", value["rng"]["torch"]), *((f"shuffle[{i}]", s) for i, s in enumerate(shuffles))]:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.numel() != size:
                what = f"a {t.dtype} tensor of {t.numel()} elements" if isinstance(t, torch.Tensor) else _value_text(t)
                return f"'rng.{key}' is {what}, expected a CPU generator state ({size} torch.uint8)"
    return None


def check_entry(path: Path, name: str, value: Any, spec: dict[str, Any]) -> None:
    """Refuse (UserError) a callback's checkpoint entry (`callbacks.NAME`) that lacks what `spec` lists."""
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a usable dnnrun checkpoint: '{name}' is {_value_text(value)}, expected dict")
    if problem := _problem(value, spec, name):
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {problem}")


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


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, members: int = 1) -> None:
    """Refuse (UserError, the first mismatch named) weights whose keys or shapes differ from the
    module's (each stacked `members` times, for trainer.seeds); the module may live on the meta
    device, holding shapes only."""
    problems = _mismatches(module, state, members)
    if problems:
        _refuse(path, "model", problems)


def _refuse(path: Path, what: str, problems: list[str]) -> None:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserError(f"{path} does not fit this {what}: {problems[0]}{more}")


def _mismatches(module: torch.nn.Module, state: dict[str, torch.Tensor], members: int = 1) -> list[str]:
    """Keys and shapes that differ between the module's state dict and `state`, in the module's order."""
    own = module.state_dict()
    found = []
    for name, tensor in own.items():
        shape = (members, *tensor.shape) if members > 1 else tuple(tensor.shape)
        if name not in state:
            found.append(f"{name} is missing from the checkpoint")
        elif tuple(state[name].shape) != shape:
            found.append(f"size mismatch for {name}: checkpoint {list(state[name].shape)}, model {list(shape)}")
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


def rng_state(shuffles: list[torch.Generator]) -> dict[str, Any]:
    """Every random stream a run draws from, as tensors and primitives (weights_only-safe): a
    shuffle generator per member."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle": [g.get_state() for g in shuffles],
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }


def restore_rng(state: dict[str, Any], shuffles: list[torch.Generator]) -> None:
    """Every stream rng_state() saved; `state` has the keys load(training=True) checks, but their
    contents can still be wrong (a generator state of another length, a short Mersenne Twister key)."""
    try:  # .cpu(): generator states are CPU tensors, but load(map_location="cuda") moves every tensor
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        for shuffle, saved in zip(shuffles, state["shuffle"], strict=True):
            shuffle.set_state(saved.cpu())
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(
            f"the checkpoint's random number generator states cannot be restored: {_first_line(exc)}"
        ) from None
