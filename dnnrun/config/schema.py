"""Checking plain config data against typed schemas and registries.

Each concern module declares a dataclass for its group (or uses `Choice` for the groups whose
shape depends on the option) and calls `parse`. Every problem lands in one `Problems` list so that
the user sees all of them at once, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from dnnrun.errors import ConfigError


class Problems:
    """Collects `key: message` lines; `raise_if_any` turns them into one ConfigError."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def did_you_mean(name: object, choices: typing.Iterable[str]) -> str:
    # Case is ignored: `act=Relu` means relu (difflib alone finds 'elu' closer); a choice that
    # differs only in case wins, else the closest one.
    folded: dict[str, str] = {}
    for choice in choices:
        folded.setdefault(str(choice).casefold(), str(choice))
    wanted = str(name).casefold()
    match = [wanted] if wanted in folded else difflib.get_close_matches(wanted, list(folded), n=1, cutoff=0.6)
    return f" (did you mean '{folded[match[0]]}'?)" if match else ""


def unknown(kind: str, name: object, choices: typing.Iterable[str]) -> str:
    choices = sorted(choices)
    return f"unknown {kind} '{name}'; valid: {', '.join(choices)}{did_you_mean(name, choices)}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """An option of a registry-backed group: the registry key and the keyword arguments for it."""

    name: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    option: str | None = None  # the YAML it came from (conf/GROUP/OPTION.yaml): he_normal for variance_scaling


# A rule on one parameter's value: (test, what the value must be).
Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
FRACTION: Rule = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def check_rules(values: Mapping[str, Any], rules: Mapping[str, Rule], key: str, problems: Problems) -> None:
    for name, (test, must) in rules.items():
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not test(value):
            problems.add(f"{key}.{name}", f"{must}, got {value!r}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested plain data as dotted keys: {"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}
    (an empty mapping stays a value)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Types


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "anything"
    if tp in (int, float, bool, str):
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_type_text(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(tp)) else text
    if origin is list:
        return f"a list of {_type_text(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    raise TypeError(f"schema type {tp!r} is not supported")


def _supported(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp in (Any, int, float, bool, str, dict, type(None)) or origin in (Literal, dict):
        return True
    if origin in (Union, types.UnionType, list):
        return all(_supported(a) for a in typing.get_args(tp))
    return False


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _normalise(value: Any, tp: Any) -> Any:
    """Ints given for float fields become floats, so saved configs and checkpoints agree."""
    if tp is float and isinstance(value, int):
        return float(value)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and float in args and int not in args:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return value


def check_value(value: Any, tp: Any, key: str, problems: Problems) -> bool:
    if not _matches(value, tp):
        problems.add(key, f"expected {_type_text(tp)}, got {value!r}")
        return False
    if _non_finite(value):
        problems.add(key, f"must be a finite number, got {value!r}")
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Registries: a name picks a callable, the remaining keys are its keyword arguments.


def _settable(entry: Any) -> tuple[dict[str, Any], bool]:
    """(name -> the type a config may give, whether other keywords are taken too).

    A registry entry either declares its parameters (`params`: name -> type, for a class of
    another library, whose signature cannot be read without importing it) or is read from its
    callable's signature: the parameters with defaults (the builder supplies the rest)."""
    declared = getattr(entry, "params", None)
    if isinstance(declared, Mapping):
        return dict(declared), False
    fn = _callable(entry)
    sig = inspect.signature(fn)
    settable = {
        n: p
        for n, p in sig.parameters.items()
        if p.default is not inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return {n: _param_type(fn, p) for n, p in settable.items()}, open_ended


def _annotation(fn: Callable, param: inspect.Parameter) -> Any:
    """One parameter's annotation, evaluated as typing.get_type_hints would, but alone: the others
    (a tensor's, say) may name a module that is not imported, and need not be."""
    target = fn.__init__ if isinstance(fn, type) else fn if inspect.isroutine(fn) else type(fn).__call__
    hint = param.annotation
    if isinstance(hint, str):
        try:
            hint = eval(hint, getattr(target, "__globals__", {}))  # noqa: S307 (a source annotation)
        except Exception:  # a name that does not resolve here: fall back to the default's type
            return None
    return None if hint is inspect.Parameter.empty else hint


def _param_type(fn: Callable, param: inspect.Parameter) -> Any:
    """The type a parameter accepts: its annotation where we can check it, else its default's type."""
    hint = _annotation(fn, param)
    if hint is not None and _supported(hint) and _matches(param.default, hint):
        return hint  # e.g. not torch's Union[float, Tensor], which falls back to "a number"
    default = param.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    if isinstance(default, str):
        return str
    if isinstance(default, tuple):
        return tuple
    if isinstance(default, list):
        return list
    return Any


def bind_params(entry: Any, params: Mapping[str, Any], key: str, label: str, problems: Problems) -> dict[str, Any]:
    """The keyword arguments of a registry entry, checked against the parameters it takes."""
    settable, open_ended = _settable(entry)
    bound: dict[str, Any] = {}
    for name, value in params.items():
        if name not in settable:
            if not open_ended:
                problems.add(
                    f"{key}.{name}",
                    f"not a parameter of {label}; valid: {', '.join(settable) or 'none'}"
                    + did_you_mean(name, settable),
                )
                continue
            bound[name] = value
            continue
        tp = settable[name]
        if tp in (list, tuple):  # a sequence of numbers (betas, boundaries, ...); its rules check the rest
            if not isinstance(value, list):
                problems.add(f"{key}.{name}", f"expected a list, got {value!r}")
                continue
            if _non_finite(value):
                problems.add(f"{key}.{name}", f"must hold finite numbers, got {value!r}")
                continue
            bound[name] = tp(value)
        elif check_value(value, tp, f"{key}.{name}", problems):
            bound[name] = _normalise(value, tp)
    return bound


# ---------------------------------------------------------------------------------------------
# Dataclass schemas


def parse(
    cls: type,
    raw: Any,
    key: str,
    problems: Problems,
    registry: Mapping[str, Any] | None = None,
    kind: str | None = None,
) -> Any:
    """Build `cls` from plain data, recording every problem; returns None if it cannot be built.

    With a registry, `raw["name"]` must be one of its keys. If `cls` has a `params` field, keys
    that are not fields are keyword arguments of `registry[name]`, checked against its signature.
    After the fields are typed, `cls.check(self, problems, key)` (if defined) checks ranges.
    """
    if not isinstance(raw, Mapping):
        problems.add(key, f"expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    takes_params = "params" in fields
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in raw.items():
        (values if name in fields and name != "params" else extra)[name] = value
    if "params" in raw and takes_params:  # a saved config carries params already split off
        extra.update(raw["params"] or {})

    reported = len(problems.items)
    bad: set[str] = set()  # fields whose value is unusable: left at their defaults for the range checks
    for name, f in fields.items():
        if name == "params":
            continue
        fkey = f"{key}.{name}"
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(fkey, "missing")
                bad.add(name)
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = parse(tp, values[name], fkey, problems)
            if values[name] is None:
                bad.add(name)
        elif check_value(values[name], tp, fkey, problems):
            values[name] = _normalise(values[name], tp)
        else:
            bad.add(name)

    name = values.get("name")
    factory = None
    if registry is not None and "name" not in bad:
        if name in registry:
            factory = registry[name]
        else:
            problems.add(f"{key}.name", unknown(kind or key, name, registry))
            bad.add("name")
    if extra:
        if takes_params and factory is not None:
            values["params"] = bind_params(factory, extra, key, f"{kind or key} '{name}'", problems)
        elif not takes_params:
            valid = [n for n in fields]
            for extra_name in extra:
                problems.add(
                    f"{key}.{extra_name}",
                    f"unknown key; valid keys: {', '.join(valid)}{did_you_mean(extra_name, valid)}",
                )

    # Range checks run on the usable fields even when others are broken, so that every problem
    # is reported in one go; a field without a default that is broken leaves nothing to check.
    if any(fields[n].default is dataclasses.MISSING and fields[n].default_factory is dataclasses.MISSING for n in bad):
        return None
    obj = cls(**{n: v for n, v in values.items() if n not in bad})
    check = getattr(obj, "check", None)
    if check is not None:
        check(_Except(problems, [f"{key}.{n}" for n in bad]), key)
    return obj if len(problems.items) == reported else None


class _Except(Problems):
    """Forwards problems except those under keys already reported as broken."""

    def __init__(self, target: Problems, skip: list[str]):
        super().__init__()
        self.target, self.skip = target, skip

    def add(self, key: str, message: str) -> None:
        if not any(key == s or key.startswith(s + ".") for s in self.skip):
            self.target.add(key, message)


def _no_params() -> None:
    """Stands in for an option that builds nothing (e.g. norm `none`): it takes no parameters."""


def _callable(entry: Any) -> Callable:
    """Registry entries are callables, or small records whose `build` is the callable (or None)."""
    return getattr(entry, "build", entry) or _no_params


def parse_choice(raw: Any, registry: Mapping[str, Any], key: str, kind: str, problems: Problems) -> Choice | None:
    return parse(Choice, raw, key, problems, registry=registry, kind=kind)
