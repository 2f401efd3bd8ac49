"""Config checking: typed schemas, registries, every problem reported at once."""

from __future__ import annotations

import copy

import pytest

from conftest import COMPANIONS, compose_raw
from dnnrun.cli import CONFIG_DIR, check_overrides
from dnnrun.config.run_config import GROUPS, parse_run_config
from dnnrun.errors import ConfigError

OPTIONS = sorted(
    (group.name, path.stem) for group in CONFIG_DIR.iterdir() if group.is_dir() for path in group.glob("*.yaml")
)


def test_every_config_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert groups == {
        "data",
        "model",
        "init",
        "act",
        "norm",
        "optimizer",
        "schedule",
        "regularizer",
        "trainer",
        "logger",
        "pretrain",
        "experiment",
    }
    assert groups - {"experiment"} <= set(GROUPS)  # each is checked


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_passes_the_checks(group, option):
    overrides = [f"{group}=[{option}]" if group == "regularizer" else f"{group}={option}"]
    cfg = parse_run_config(compose_raw(*overrides, *COMPANIONS.get(overrides[0], [])))  # no data=...: no clash
    if group not in ("experiment", "trainer"):
        assert getattr(cfg, group) is not None


def _raw():
    return compose_raw("data=synthetic")


def _problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    return info.value.problems


def test_every_problem_is_reported_together():
    raw = _raw()
    raw["trainer"]["epochs"] = "abc"
    raw["trainer"]["batch_size"] = 0
    raw["optimizer"]["lr"] = float("nan")
    raw["optimizer"]["momentun"] = 0.9
    raw["act"]["name"] = "rellu"
    raw["data"]["scaling"] = "minmax"
    raw["trainer"]["seed"] = -1
    problems = _problems(raw)
    assert len(problems) == 7
    text = "\n".join(problems)
    assert "trainer.epochs: expected an integer, got 'abc'" in text
    assert "trainer.batch_size: must be >= 1, got 0" in text
    assert "optimizer.lr: must be a finite number, got nan" in text
    assert "optimizer.momentun: not a parameter of optimizer 'sgd'" in text and "did you mean 'momentum'" in text
    assert (
        "act.name: unknown activation 'rellu'; valid: elu, gelu, leaky_relu" in text
        and "(did you mean 'relu'?)" in text
    )
    assert "data.scaling: expected one of 'none', 'unit', 'standardize', got 'minmax'" in text
    assert "trainer.seed: must be in [0, 2**32), got -1" in text


def test_unknown_keys_in_fixed_schemas_list_the_valid_keys():
    raw = _raw()
    raw["trainer"]["epochz"] = 3
    raw["modell"] = {}
    text = "\n".join(_problems(raw))
    assert "trainer.epochz: unknown key; valid keys: epochs" in text and "(did you mean 'epochs'?)" in text
    assert "modell: unknown top-level key" in text and "(did you mean 'model'?)" in text


def test_missing_group_and_missing_name_are_reported():
    raw = _raw()
    del raw["schedule"]
    del raw["optimizer"]["name"]
    text = "\n".join(_problems(raw))
    assert "schedule: missing" in text and "optimizer.name: missing" in text


@pytest.mark.parametrize(
    "key, value, message",
    [
        (("optimizer", "lr"), 0, "must be > 0"),
        (("optimizer", "lr"), float("inf"), "finite"),
        (("optimizer", "momentum"), 1.0, "must be in [0, 1)"),
        (("optimizer", "weight_decay"), -0.1, "must be >= 0"),
        (("optimizer", "nesterov"), "yes", "expected true or false"),
        (("trainer", "clip_norm"), -1.0, "must be > 0 or null"),
        (("trainer", "device"), "gpu", "expected auto, cpu, cuda, cuda:N or mps"),
        (("trainer", "monitor"), "val/los", "expected one of 'val/loss', 'val/acc'"),
        (("trainer", "early_stopping"), {"patience": 0}, "must be >= 1 or null"),
        (("data", "val_size"), 0, "must be a fraction in (0, 1) or a whole number"),
        (("data", "classes"), [1, 1], "at least two distinct labels"),
        (("model", "hidden"), [300, 0], "every width must be >= 1"),
        (("model", "depth"), 3, "set both depth and width"),
        (("init", "scale"), -2.0, "must be > 0"),
        (("init", "mode"), "fan_middle", "expected one of 'fan_in', 'fan_out', 'fan_avg'"),
    ],
)
def test_range_and_type_checks(key, value, message):
    raw = _raw()
    raw[key[0]][key[1]] = value
    assert message in "\n".join(_problems(raw))


def test_ints_given_for_float_parameters_become_floats():
    raw = _raw()
    raw["optimizer"]["lr"] = 1
    cfg = parse_run_config(raw)
    assert cfg.optimizer.params["lr"] == 1.0 and isinstance(cfg.optimizer.params["lr"], float)


def test_the_raw_config_is_kept_unchanged_for_checkpoints():
    raw = _raw()
    before = copy.deepcopy(raw)
    assert parse_run_config(raw).raw == before


def test_override_checks_name_the_option_or_key_and_suggest():
    assert check_overrides(["optimizer=adam", "optimizer.betas=[0.9,0.99]", "trainer.epochs=3"]) == []
    (problem,) = check_overrides(["norm=batchnom"])
    assert "unknown norm option 'batchnom'; valid: batchnorm, layernorm, none (did you mean 'batchnorm'?)" in problem
    (problem,) = check_overrides(["optimizer=adam", "optimizer.momentum=0.9"])  # adam has no momentum
    assert problem.startswith("optimizer.momentum: unknown key 'momentum' in optimizer; valid: option, name, lr, betas")
    (problem,) = check_overrides(["trainer.early_stopping.patiense=3"])
    assert "unknown key 'patiense' in trainer.early_stopping" in problem and "did you mean 'patience'" in problem
    (problem,) = check_overrides(["regularizer=[l2,l3]"])
    assert problem.startswith("regularizer=l3: unknown regularizer option 'l3'; valid: alpha_dropout, dropout, l1")


CONTRADICTIONS = {  # the overrides, and what the one problem must say (naming both keys where there are two)
    "regularizer=[l2,l2]": "regularizer: l2 is chosen twice; give each option once",
    "trainer.seeds=[0,1] trainer.seed=3": "trainer.seed: 3 beside trainer.seeds=[0, 1]: the members' seeds are",
    "data.val_size=0.5 data.test_size=0.6": "data.val_size: 0.5 with data.test_size=0.6 adds up to 1 or more",
    "pretrain=rotation data=synthetic": "pretrain: pretrain=rotation rotates square images; data=synthetic's",
}


@pytest.mark.parametrize("overrides", CONTRADICTIONS)
def test_contradictions_are_refused_before_anything_is_made(overrides, tmp_path):
    from dnnrun import cli

    problems = cli.check_command_line([*overrides.split(), f"outputs={tmp_path}"])
    assert any(CONTRADICTIONS[overrides] in p for p in problems), problems
    assert list(tmp_path.iterdir()) == []
