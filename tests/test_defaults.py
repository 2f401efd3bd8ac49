"""One source of truth for the config's defaults. The YAML in conf/ is what a run is composed from;
the dataclasses' defaults and the registry functions' keyword defaults are what a config without
the key (an older saved one, a test's) falls back to. Nothing else holds them equal: these tests do.

- every option's YAML gives every field of its group's dataclass that applies to it (a composed
  config never falls back), and the group's default option (conf/config.yaml's defaults) gives the
  dataclass' values;
- every option's YAML of a registry group gives every parameter its function takes, at the
  function's defaults when the option is named after its registry entry; a preset (he_normal for
  variance_scaling, leaky_relu_0.2 for leaky_relu) is data: it picks its own values;
- each YAML names itself: `option:` is its file name."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from omegaconf import OmegaConf

from conftest import compose_raw
from dnnrun.cli import CONFIG_DIR
from dnnrun.config import run_config
from dnnrun.config.schema import _callable, _settable
from dnnrun.data.datasets import DATASETS, DataConfig
from dnnrun.models.registry import MODELS
from dnnrun.optim.schedules import SCHEDULES
from dnnrun.techniques.activations import ACTIVATIONS
from dnnrun.techniques.init import INITIALIZERS
from dnnrun.techniques.norms import NormConfig
from dnnrun.techniques.regularizers import REGULARIZERS
from dnnrun.training.pretrain import PRETRAINERS

DEFAULT_OPTIONS = {g: o for d in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]
                   if isinstance(d, dict) for g, o in d.items()}  # fmt: skip
NOT_APPLICABLE = {  # fields an option's YAML leaves out because they mean nothing for it
    ("data", "digits", "download"): "bundled in the package",
    ("data", "synthetic", "download"): "generated",
    ("data", "mnist", "test_size"): "torchvision's sets have their official test split",
    ("data", "fashion_mnist", "test_size"): "as mnist",
    ("data", "cifar10", "test_size"): "as mnist",
    ("norm", "none", "placement"): "no norm layer to place",
    ("norm", "none", "on_inputs"): "no norm layer for the inputs",
}
LABELS = {"option", "name", "params"}  # which YAML (and registry entry) it is, and the options' own keywords


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _nested(cls) -> dict:
    """The defaults as the YAML writes them: nested dataclasses as mappings."""
    hints = typing.get_type_hints(cls)
    return {f.name: _nested(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else _default(f)
            for f in dataclasses.fields(cls) if f.name not in LABELS}  # fmt: skip


def _yaml(group: str, option: str) -> dict:
    """The option's values as composed (interpolations resolved)."""
    return compose_raw(f"{group}={option}")[group]


SCHEMAS = [
    *[("model", name, arch.config) for name, arch in MODELS.items()],
    *[("data", p.stem, DataConfig) for p in sorted((CONFIG_DIR / "data").glob("*.yaml"))],
    *[("norm", p.stem, NormConfig) for p in sorted((CONFIG_DIR / "norm").glob("*.yaml"))],
    *[("trainer", p.stem, run_config.TrainerConfig) for p in sorted((CONFIG_DIR / "trainer").glob("*.yaml"))],
]


@pytest.mark.parametrize("group, option, cls", SCHEMAS, ids=[f"{g}={o}" for g, o, _ in SCHEMAS])
def test_every_yaml_gives_every_field_of_its_dataclass(group, option, cls):
    given = _yaml(group, option)
    missing = {f for f in _nested(cls) if f not in given and (group, option, f) not in NOT_APPLICABLE}
    assert not missing, f"conf/{group}/{option}.yaml lacks {missing}"


@pytest.mark.parametrize("group, option, cls", SCHEMAS, ids=[f"{g}={o}" for g, o, _ in SCHEMAS])
def test_the_default_option_gives_the_dataclass_defaults(group, option, cls):
    if DEFAULT_OPTIONS.get(group, option) != option:
        return  # not the group's default: its values are its own
    given, defaults = _yaml(group, option), _nested(cls)
    if group == "data":
        defaults.pop("root")  # DNNRUN_DATA or the cache folder: the YAML and the dataclass read the same
    for key, value in defaults.items():
        if (group, option, key) not in NOT_APPLICABLE:
            assert given[key] == (list(value) if isinstance(value, tuple) else value), f"{group}.{key}"


@pytest.mark.parametrize("section", ["transfer", "lr_find", "evaluate", "predict"])
def test_config_yaml_sections_give_their_dataclass_defaults(section):
    cls = {"transfer": run_config.TransferConfig, "lr_find": run_config.LRFindConfig,
           "evaluate": run_config.EvaluateConfig, "predict": run_config.PredictConfig}[section]  # fmt: skip
    assert compose_raw()[section] == _nested(cls)


REGISTRIES = {"init": INITIALIZERS, "act": ACTIVATIONS, "schedule": SCHEDULES, "regularizer": REGULARIZERS,
              "pretrain": PRETRAINERS, "data": DATASETS}  # fmt: skip
KEYWORD_OPTIONS = [(g, p.stem) for g in REGISTRIES for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def _keywords(group: str, option: str) -> tuple[str, dict]:
    """The registry entry's name and the keyword arguments the option's YAML gives it."""
    if group == "regularizer":
        node = compose_raw(f"regularizer=[{option}]")["regularizer"][option]
    else:
        node = _yaml(group, option)
    fields = set(_nested(DataConfig)) if group == "data" else set()
    return node["name"], {k: v for k, v in node.items() if k not in LABELS | fields}


@pytest.mark.parametrize("group, option", KEYWORD_OPTIONS, ids=[f"{g}={o}" for g, o in KEYWORD_OPTIONS])
def test_every_yaml_gives_its_functions_keywords_at_their_defaults(group, option):
    name, given = _keywords(group, option)
    entry = REGISTRIES[group][name]
    settable, _ = _settable(entry)
    parameters = inspect.signature(_callable(entry)).parameters
    assert set(settable) <= set(given), f"conf/{group}/{option}.yaml lacks {set(settable) - set(given)}"
    if option != name:
        return  # a preset: its values are what it exists for
    for key, value in given.items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if default is not inspect.Parameter.empty:
            assert value == (list(default) if isinstance(default, tuple) else default), f"{group}={option}: {key}"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_yaml_names_itself(path):
    node = OmegaConf.to_container(OmegaConf.load(path))
    if path.parent.name in ("regularizer",):  # nested under its own name
        assert list(node) == [path.stem]
    elif path.parent.name not in ("experiment", "hydra", "launcher"):
        assert node.get("option") == path.stem
