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
    checksum                  sha256 of every tensor above (checksum()), which load() verifies: a bit
                              flipped on a disk or in a copy is refused, not trained on or applied

An export (dnnrun-export, safetensors) holds the weights and the preprocessing's tensors, and in
its metadata the format, the version, the config and the rest of the preprocessing as JSON and the
checksum of its tensors. Whatever a file holds, load() checks it before a reader uses it: nesting,
tensors whose shapes claim more values than their storage has, weights that are not finite,
preprocessing that cannot apply (a std of 0, a mean of another shape than the inputs').

Version 1 (before one loop served single runs and members, and before checksums) is read: a single
run's training checkpoint is upgraded on load, a members' one is refused with the reason; an export
without a version is one of that time, read without a checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
import random
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnnrun.errors import ConfigError, UserError
from dnnrun.store.rundir import atomic_write
from dnnrun.training.state import TrainState

FORMAT = "dnnrun-checkpoint"
VERSION = 2
WEIGHTS_FORMAT = "dnnrun-weights"  # safetensors files written by dnnrun-export
INPUTS_PREFIX = "__inputs__."  # an export's preprocessing tensors (no module of a model is named so)
CHECKSUM = "checksum"  # the entry (an export: the metadata key) that holds checksum()'s digest
# Bounds on what a crafted file can make a reader do: dnnrun nests at most 5 levels (optimizer.state.0.
# exp_avg, callbacks.early_stopping.members[0].best), json and OmegaConf recurse once or more a level.
MAX_DEPTH = 32
MAX_ELEMENTS = 2**36  # in one tensor: 256 GiB of float32, beyond any model's tensor
MAX_EXAMPLE = 2**28  # values in one example (inputs.shape): 1 GiB of float32 (a 3 x 9000 x 9000 image fits)


def serialize(state: dict[str, Any]) -> bytes:
    """The checkpoint's bytes, with the checksum of the tensors it holds (a `checksum` that `state`
    carries from a loaded file is replaced: the tensors may have changed since)."""
    state = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM: checksum(state)}, buffer)
    return buffer.getvalue()


def checksum(state: dict[str, Any]) -> str:
    """sha256 (hex) of every tensor in `state` but its own checksum entry, nested in dicts (their keys
    in sorted order), lists and tuples: each tensor's place, dtype and shape, then its raw bytes.
    Other values are left out (a changed config is no damage the reader would not see). sha256, not
    blake2b: with the SHA instructions of x86 (AMD since Zen, Intel since Ice Lake) and ARMv8 it
    runs at about twice blake2b's speed (1.8 against 0.86 GB/s on an EPYC core)."""
    digest = hashlib.sha256()
    for where, t in _tensors({k: v for k, v in state.items() if k != CHECKSUM}):
        digest.update(f"{_name(where)} {t.dtype} {list(t.shape)}\n".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class _TooDeep(Exception):
    def __init__(self, where: tuple):
        self.where = where


def _tensors(value: Any) -> typing.Iterator[tuple[tuple, torch.Tensor]]:
    """(place, tensor) for every tensor nested in dicts, lists and tuples, in a fixed order: dict keys
    sorted (by type, then text: optimizer states have int keys), sequences in theirs. Iterative, as a
    crafted file may nest deeper than Python recurses; deeper than MAX_DEPTH raises _TooDeep."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield where, value
        elif isinstance(value, (dict, list, tuple)):
            if len(where) >= MAX_DEPTH:
                raise _TooDeep(where)
            if isinstance(value, dict):
                items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
            else:
                items = list(enumerate(value))
            stack.extend(((*where, k), v) for k, v in reversed(items))


def _name(where: tuple) -> str:
    """A nested entry's name as messages give it: model.hidden1.linear.weight, rng.shuffle[0]."""
    text = ""
    for i, key in enumerate(where):
        text += f"[{key}]" if isinstance(key, int) and i else f"{'.' if i else ''}{key}"
    return text


def save(path: Path, state: dict[str, Any], before_rename=None) -> None:
    blob = serialize(state)
    atomic_write(path, lambda f: f.write(blob), before_rename)


def load(path: Path, map_location: str | torch.device = "cpu", training: bool = False) -> dict[str, Any]:
    """A dnnrun checkpoint (.pt, read with weights_only=True, never without) or exported weights
    (.safetensors, which hold tensors and strings only), checked to hold what its reader uses: the
    model's tensors and the config, and with training=True (resuming) also the optimizer, schedule,
    counters, callbacks' states and RNG states. Before a reader uses them, the tensors are checked
    to be what the file's checksum says (an export's: as it is read), every weight to be finite and
    the preprocessing to apply."""
    path = Path(path)
    exported = path.suffix == ".safetensors"
    state = _load_safetensors(path, map_location) if exported else _load_pt(path, map_location)
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
    if problem := _tensors_problem(state):  # first: nothing below may recurse or copy a tensor before it
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {problem}")
    if not exported and (version > 1 or CHECKSUM in state):  # version 1 wrote none
        _verify(path, state.get(CHECKSUM, _MISSING), checksum(state), f"it has no '{CHECKSUM}' entry")
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
    trainer = state.get("trainer")
    members = trainer.get("members") if isinstance(trainer, dict) and version > 1 else None
    if not training and isinstance(members, list) and len(members) > 1:
        raise UserError(
            f"{path} holds {len(members)} members trained together (trainer.seeds); read one member's "
            f"weights from its own directory: {path.parent.parent / 'members' / 'seed_N' / 'checkpoints' / 'best.pt'}"
        )
    if problem := weights_problem(state["model"]) or _inputs_problem(state.get("inputs")):
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {problem}")
    return state


_MISSING = object()


def _verify(path: Path, stored: Any, computed: str, missing: str) -> None:
    """Refuse a file whose checksum is missing (`missing`: how that reads), not a string, or not
    `computed`, the checksum of the tensors as read."""
    if stored is _MISSING:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: {missing}")
    if not isinstance(stored, str):
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: '{CHECKSUM}' is {_value_text(stored)}, expected str"
        )
    if stored != computed:
        raise UserError(f"{path} is damaged: checksum differs")


def _tensors_problem(state: dict[str, Any]) -> str | None:
    """The first entry nested too deep, or tensor that is not what torch.save writes of a real one
    (tensor_problem), or None. Before anything reads the values: an expanded tensor made contiguous
    (to hash or export it) or compared (isfinite) takes the memory its shape claims."""
    try:
        for where, t in _tensors(state):
            if problem := tensor_problem(_name(where), t):
                return problem
    except _TooDeep as exc:
        return f"'{_name(exc.where[:1])}' nests dicts and lists more than {MAX_DEPTH} levels deep"
    return None


def tensor_problem(name: str, t: torch.Tensor) -> str | None:
    """Why tensor `name` cannot be used as it is, or None: a layout other than dense, an element
    count beyond MAX_ELEMENTS, or a storage smaller than its shape claims (an expanded tensor, of
    stride 0, from a crafted file: dnnrun saves none)."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return f"'{name}' is not a dense tensor with its values ({t.layout}, on {t.device.type})"
    if t.numel() > MAX_ELEMENTS:
        return f"'{name}' claims {t.numel():,} values (shape {list(t.shape)}), more than {MAX_ELEMENTS:,}"
    stored = t.untyped_storage().nbytes() // t.element_size()
    if t.numel() > stored:
        return (
            f"'{name}' claims {t.numel():,} values (shape {list(t.shape)}) but its storage holds {stored:,}: "
            "an expanded tensor, which no dnnrun writes"
        )
    return None


def weights_problem(weights: dict[str, torch.Tensor]) -> str | None:
    """The first weight that holds NaN or infinite values, named with their counts, or None."""
    for name, t in weights.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        # A NaN or inf makes the sum NaN or inf: one pass without a mask (isfinite's is ~20x slower on a
        # CPU); a sum that overflowed from finite values is told apart by the values themselves.
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            return f"weight '{name}' {_not_finite(t)}"
    return None


def _not_finite(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    return f"holds {nan:,} NaN and {int((~torch.isfinite(t)).sum()) - nan:,} infinite of its {t.numel():,} values"


def _inputs_problem(inputs: dict[str, Any] | None) -> str | None:
    """What keeps the preprocessing (`inputs`, its entries' types checked by _problem) from applying
    to inputs of its shape, or None: an unknown scaling, a divisor that is not a finite number > 0,
    a shape that is not a few positive sizes, a mean or std of another shape or not finite."""
    if inputs is None:
        return None
    from dnnrun.data.datasets import DataConfig

    scalings = typing.get_args(typing.get_type_hints(DataConfig)["scaling"])
    scaling, shape = inputs["scaling"], inputs["shape"]
    if scaling not in scalings:
        return f"'inputs.scaling' is {scaling!r}, expected one of {', '.join(scalings)}"
    if scaling == "unit" and not (math.isfinite(inputs["max_value"]) and inputs["max_value"] > 0):
        return f"'inputs.max_value' is {inputs['max_value']!r}: scaling=unit divides by it (expected finite, > 0)"
    sizes_ok = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    if not 1 <= len(shape) <= 4 or not sizes_ok or math.prod(shape) > MAX_EXAMPLE:
        return (
            f"'inputs.shape' is {_value_text(shape)}, expected 1 to 4 sizes > 0 (features, or channels, height "
            f"and width) of at most {MAX_EXAMPLE:,} values in all"
        )
    if bad := [c for c in inputs["class_names"] if not isinstance(c, str)]:
        return f"'inputs.class_names' holds {_value_text(bad[0])}, expected class names (str)"
    for key in ("mean", "std"):
        t = inputs[key]
        if t is None:
            if scaling == "standardize":
                return f"'inputs.{key}' is missing: scaling=standardize needs the mean and std of the training inputs"
            continue
        if not t.is_floating_point():
            return f"'inputs.{key}' is a {t.dtype} tensor, expected floating point"
        if tuple(t.shape) != tuple(shape):
            return f"'inputs.{key}' has shape {list(t.shape)}, expected the inputs' shape {list(shape)}"
        if not torch.isfinite(t).all():
            return f"'inputs.{key}' {_not_finite(t)}"
        if key == "std" and (zeros := int((t <= 0).sum())):
            return f"'inputs.std' holds {zeros:,} of {t.numel():,} values <= 0: scaling=standardize divides by it"
    return None


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
    config = state.get("config")
    trainer = config.get("trainer") if isinstance(config, dict) else None
    seed = trainer.get("seed", 0) if isinstance(trainer, dict) else 0
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


def run_config(state: dict[str, Any], path: Path):
    """The RunConfig of a loaded checkpoint's config; one that is invalid (a file written by hand, or
    by a dnnrun whose options differ) is a UserError naming the file and listing every problem."""
    from dnnrun.config.run_config import parse_run_config

    try:
        return parse_run_config(state["config"])
    except ConfigError as exc:
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: the config saved in it is invalid:\n"
            + "\n".join(f"  - {p}" for p in exc.problems)
        ) from None


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


def write_safetensors(state: dict[str, Any], out: Path) -> Path:
    """The model's weights and the run's config of a loaded checkpoint (`state`, as load() returns
    it), as safetensors (no code can hide in it), written atomically, with the checksum of its tensors."""
    from safetensors.torch import save

    tensors = {name: t.contiguous() for name, t in state["model"].items()}  # load() refused expanded ones
    metadata = {"format": WEIGHTS_FORMAT, "version": str(VERSION), "config": json.dumps(state["config"])}
    if state.get("inputs") is not None:  # the preprocessing: its tensors beside the weights, the rest as JSON
        inputs = dict(state["inputs"])
        for key in ("mean", "std"):
            if (t := inputs.pop(key)) is not None:
                tensors[f"{INPUTS_PREFIX}{key}"] = t.contiguous()
        metadata["inputs"] = json.dumps(inputs)
    metadata[CHECKSUM] = checksum(tensors)
    atomic_write(Path(out), lambda f: f.write(save(tensors, metadata)))
    return Path(out)


def _load_safetensors(path: Path, map_location) -> dict[str, Any]:
    """An export as load() returns a checkpoint: its tensors checked against its checksum (one of
    version 1, which has none, as they are), the JSON of its metadata parsed into plain data."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: the file is damaged ({_first_line(exc)})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise UserError(f"{path} holds no dnnrun weights (exported with dnnrun-export)")
    if "config" not in metadata:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: its metadata has no 'config' entry")
    config = _metadata_json(path, metadata, "config")
    inputs = None
    if "inputs" in metadata:
        inputs = _metadata_json(path, metadata, "inputs")
        if not isinstance(inputs, dict):
            raise UserError(
                f"{path} is not a usable dnnrun checkpoint: its metadata 'inputs' is {_value_text(inputs)}, "
                "expected a JSON object"
            )
        inputs = {**inputs, "mean": None, "std": None}
    version = metadata.get("version", "1")  # exports before checksums had no version
    version = int(version) if version.isdecimal() else version
    if isinstance(version, int) and 1 < version <= VERSION:  # a newer one is refused by load()
        computed = checksum(tensors)  # before the preprocessing's tensors are taken out
        _verify(path, metadata.get(CHECKSUM, _MISSING), computed, f"its metadata has no '{CHECKSUM}' entry")
    if inputs is not None:
        for key in ("mean", "std"):
            inputs[key] = tensors.pop(f"{INPUTS_PREFIX}{key}", None)
    return {"format": FORMAT, "version": version, "model": tensors, "config": config, "inputs": inputs}


def _metadata_json(path: Path, metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except RecursionError:  # json recurses once a level: a crafted file nests 200,000
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: its metadata '{key}' nests more levels than JSON can be read"
        ) from None
    except ValueError as exc:
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: its metadata '{key}' is not valid JSON ({_first_line(exc)})"
        ) from None


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
