"""The diagnosis says what to try: every rule's remedies (docs/reference/diagnosis.md: "which remedy for which
problem") are real dnnrun overrides, and they are printed under each finding."""

from __future__ import annotations

import copy
import json
import pickle
import shlex

import pytest
from hydra.errors import HydraException

from conftest import compose_raw
from dnnrun.cli import CONFIG_DIR
from dnnrun.config.run_config import parse_run_config
from dnnrun.errors import ConfigError
from dnnrun.insight import diagnosis
from dnnrun.insight.console import console, print_diagnosis
from dnnrun.insight.diagnosis import REMEDIES, Finding, Remedy

EVERY_REMEDY = sorted({r for remedies in REMEDIES.values() for r in remedies}, key=str)


def _records(**hidden1) -> list[dict]:
    """Per-layer records of three monitored steps with these statistics in hidden1."""
    layers = {
        "hidden1": {"grad_norm": 1.0, "act_std": 1.0, **hidden1},
        "hidden2": {"grad_norm": 1.0, "act_std": 1.0},
        "output": {"grad_norm": 1.0},
    }
    return [{"step": s, "layers": copy.deepcopy(layers)} for s in (10, 20, 30)]


def _history(val: list[float], train: list[float], acc: float) -> list[dict]:
    return [
        {"epoch": i + 1, "val/loss": v, "train/loss": t, "val/acc": acc} for i, (v, t) in enumerate(zip(val, train))
    ]


SICK = {  # inputs that make each rule speak: (history, records)
    "vanishing_gradients": ([], _records(grad_norm=1e-5)),
    "exploding_gradients": ([], _records(grad_norm=5e3)),
    "dead_units": ([], _records(dead=0.5)),
    "saturated_units": ([], _records(saturated=0.5)),
    "activation_drift": ([], _records(act_std=1e-4)),
    "not_learning": (_history([2.30, 2.30, 2.30], [2.31, 2.30, 2.30], acc=0.1), []),
    "overfitting": (_history([1.0, 0.6, 0.5, 0.55, 0.6, 0.7], [1.0, 0.6, 0.4, 0.3, 0.2, 0.1], acc=0.9), []),
}


def test_every_rule_has_remedies_and_each_speaks_with_its_own():
    assert set(SICK) == set(REMEDIES)  # a new rule needs its remedies, and a case here
    for rule, (history, records) in SICK.items():
        found = diagnosis.diagnose(history, records, n_classes=10)
        assert [f.rule for f in found] == [rule], (rule, found)
        assert found[0].remedies == REMEDIES[rule] and REMEDIES[rule]


def _compose(remedy: Remedy):
    """The default config with the remedy's overrides, composed by Hydra from conf/ (an unknown
    group option or key raises) and checked as dnnrun checks it (a bad value raises)."""
    raw = compose_raw("data=synthetic", *remedy.overrides)
    return raw, parse_run_config(raw)


@pytest.mark.parametrize("remedy", EVERY_REMEDY, ids=str)
def test_every_remedy_is_a_valid_override_of_a_real_option_or_key(remedy: Remedy):
    raw, _ = _compose(remedy)
    for override in remedy.overrides:
        key, value = override.split("=", 1)
        if (CONFIG_DIR / key).is_dir():  # a group: one option (act=elu) or a list of them ('regularizer=[l2]')
            for option in value.strip("[]").split(","):
                assert (CONFIG_DIR / key / f"{option}.yaml").is_file(), override
        else:  # a key, which now holds the value
            node = raw
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, (override, node)


@pytest.mark.parametrize("override", ["act=leakyrelu", "trainer.clipnorm=1.0", "mode=lr_finder"])
def test_a_misspelled_remedy_would_be_caught(override: str):
    with pytest.raises((HydraException, ConfigError)):
        _compose(Remedy((override,)))


@pytest.mark.parametrize("remedy", EVERY_REMEDY, ids=str)
def test_a_remedy_prints_as_typed_in_a_shell(remedy: Remedy):
    command = str(remedy).split(" (", 1)[0]  # before its note
    assert shlex.split(command) == list(remedy.overrides)  # 'regularizer=[l2]' quoted, as the diagnosis prints it


def test_a_finding_is_stored_and_compared_as_its_sentence():
    (finding,) = diagnosis.diagnose(*SICK["dead_units"], n_classes=10)
    assert isinstance(finding, str) and finding == str(finding)
    assert json.loads(json.dumps({"diagnosis": [finding]})) == {"diagnosis": [str(finding)]}  # summary.json
    for copied in (copy.deepcopy(finding), pickle.loads(pickle.dumps(finding))):
        assert (copied, copied.rule, copied.remedies) == (finding, "dead_units", REMEDIES["dead_units"])
    with pytest.raises(KeyError):
        Finding("no_such_rule", "a rule without remedies cannot speak")


def _printed(found: list) -> str:
    with console.capture() as captured:
        print_diagnosis(found)
    return captured.get()


def test_each_finding_is_printed_with_what_to_try():
    found = diagnosis.diagnose(*SICK["dead_units"], n_classes=10)
    out = _printed(["training diverged at step 3: the training loss is nan", *found])
    assert out.splitlines() == [
        "diagnosis:",
        "  - training diverged at step 3: the training loss is nan",  # a plain sentence: no remedies
        f"  - {found[0]}",
        (
            "    try: act=leaky_relu, act=leaky_relu_0.2, act=rrelu, act=prelu, act=elu, "
            "mode=lr_find (the learning-rate range test, to pick optimizer.lr)"
        ),
    ]
    overfit = diagnosis.diagnose(*SICK["overfitting"], n_classes=10)
    assert (
        "    try: 'regularizer=[l2]', 'regularizer=[dropout]', 'regularizer=[max_norm]', "
        "trainer.early_stopping.patience=10"
    ) in _printed(overfit).splitlines()


def test_a_healthy_run_is_said_to_be_so_in_one_line():
    assert _printed([]) == "(no diagnosis: nothing unusual was seen)\n"
