"""Checkpoints that torch.load(weights_only=True) reads but that are not what dnnrun wrote, and
JSON-lines files read while (or after) a writer appends to them.

Every reader of a checkpoint (trainer.resume, evaluate.checkpoint, transfer.source) must refuse such
a file with one clear message that names it and what is wrong, and exit 2, never with a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import last_weights, make_config, run_cli
from dnnrun.errors import UserError
from dnnrun.inference import evaluate
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, read_jsonl
from dnnrun.training import loop

SETUP = ("data=synthetic", "model.hidden=[32,16]")  # hidden2.linear.weight is (16, 32)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real training checkpoint (one epoch): every malformed file below is made from it."""
    run = tmp_path_factory.mktemp("good") / "run"
    loop.run(make_config(*SETUP[1:], "trainer.epochs=1"), run)
    return run / "checkpoints" / "last.pt"


def _changed(good: Path, out: Path, change) -> Path:
    """`good` as plain data, changed by `change(state)`, saved with torch.save: still weights_only-loadable,
    its checksum that of the changed tensors (a file made so, not damaged: tests/test_integrity.py's)."""
    state = torch.load(good, weights_only=True)
    change(state)
    state[checkpoint.CHECKSUM] = checkpoint.checksum(state)
    torch.save(state, out)
    torch.load(out, weights_only=True)  # the premise: the file itself loads
    return out


def _safetensors(good: Path, out: Path, metadata: dict[str, str]) -> Path:
    tensors = {k: t.contiguous() for k, t in torch.load(good, weights_only=True)["model"].items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


def _wrong_shape(state):
    state["model"]["hidden2.linear.weight"] = torch.zeros(16, 20)  # the model built from the widths has (16, 32)


# name: (how to make the file from a good checkpoint, what stderr must say besides the file's name)
MALFORMED = {
    "no trainer entry": (
        lambda g, d: _changed(g, d / "x.pt", lambda s: s.pop("trainer")),
        "is not a usable dnnrun checkpoint: it has no 'trainer' entry",
    ),
    "wrong shapes": (
        lambda g, d: _changed(g, d / "x.pt", _wrong_shape),
        "does not fit this model: size mismatch for hidden2.linear.weight: checkpoint [16, 20], model [16, 32]",
    ),
    "config a string": (
        lambda g, d: _changed(g, d / "x.pt", lambda s: s.update(config="x")),
        "is not a usable dnnrun checkpoint: 'config' is a str ('x'), expected dict",
    ),
    "optimizer of another model": (
        lambda g, d: _changed(g, d / "x.pt", lambda s: s["optimizer"].update(param_groups=[])),
        "does not fit this optimizer: loaded state dict has a different number of parameter groups",
    ),
    "safetensors without config": (
        lambda g, d: _safetensors(g, d / "x.safetensors", {"format": "dnnrun-weights"}),
        "is not a usable dnnrun checkpoint: its metadata has no 'config' entry",
    ),
    "safetensors with bad JSON": (
        lambda g, d: _safetensors(g, d / "x.safetensors", {"format": "dnnrun-weights", "config": "{not json"}),
        "is not a usable dnnrun checkpoint: its metadata 'config' is not valid JSON",
    ),
}


def _refused(result, path: Path, problem: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{path} {problem}" in result.stderr, result.stderr


@pytest.mark.parametrize("case", MALFORMED)
def test_resuming_from_a_malformed_checkpoint_is_refused_naming_file_and_problem(case, good: Path, tmp_path: Path):
    make, problem = MALFORMED[case]
    path = make(good, tmp_path)
    # the checkpoint's own config (epochs may change on resume): only the file can be the problem
    with pytest.raises(UserError) as info:
        loop.run(make_config(*SETUP[1:], "trainer.epochs=2", f"trainer.resume={path}"), tmp_path / "run")
    assert f"{path} {problem}" in str(info.value)
    if case != "optimizer of another model":  # whose fit shows only once the optimizer is built
        assert not (tmp_path / "run").exists()  # refused before the run made its directory


@pytest.mark.parametrize("case", ["wrong shapes", "safetensors with bad JSON"])
def test_the_cli_exits_2_on_a_malformed_checkpoint_without_a_traceback(case, good: Path, tmp_path: Path):
    path = MALFORMED[case][0](good, tmp_path)
    result = run_cli(
        *SETUP, "trainer.epochs=2", f"trainer.resume={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    _refused(result, path, MALFORMED[case][1])


def test_the_good_checkpoint_resumes(good: Path, tmp_path: Path):
    """The control: the files above fail for what was changed in them, not for the setup."""
    summary = loop.run(make_config(*SETUP[1:], "trainer.epochs=2", f"trainer.resume={good}"), tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs_run"] == 2


@pytest.mark.parametrize("case", ["wrong shapes", "no model entry"])
def test_evaluating_a_malformed_checkpoint_exits_2(case, good: Path, tmp_path: Path):
    if case == "no model entry":
        path, problem = (
            _changed(good, tmp_path / "x.pt", lambda s: s.pop("model")),
            "is not a usable dnnrun checkpoint: it has no 'model' entry",
        )
    else:
        path, problem = MALFORMED[case][0](good, tmp_path), MALFORMED[case][1]
    result = run_cli("mode=evaluate", f"evaluate.checkpoint={path}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    _refused(result, path, problem)


def test_a_malformed_transfer_source_exits_2(good: Path, tmp_path: Path):
    path = MALFORMED["config a string"][0](good, tmp_path)
    result = run_cli("data=synthetic", f"transfer.source={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _refused(result, path, MALFORMED["config a string"][1])


def test_weights_only_readers_accept_a_checkpoint_without_training_state(good: Path, tmp_path: Path):
    """evaluate and transfer need the model and its config only; resuming needs the rest too."""
    path = _changed(
        good,
        tmp_path / "weights.pt",
        lambda s: [s.pop(k) for k in (*checkpoint.TRAINING, "scaler")],
    )
    assert checkpoint.load(path)["model"].keys() == checkpoint.load(good)["model"].keys()
    evaluate.run(make_config("mode=evaluate", f"evaluate.checkpoint={path}"), tmp_path / "eval")
    with pytest.raises(UserError, match=re.escape(f"{path} holds weights only")):
        checkpoint.load(path, training=True)


REQUIRED = [
    k for k, v in {**checkpoint.WEIGHTS, **checkpoint.TRAINING}.items() if not isinstance(v, checkpoint.OptionalEntry)
]  # inputs: checkpoints before it lack it


@pytest.mark.parametrize("key", REQUIRED)
def test_resuming_needs_every_entry_the_trainer_reads(key, good: Path, tmp_path: Path):
    path = _changed(good, tmp_path / "x.pt", lambda s: s.pop(key))
    with pytest.raises(
        UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: it has no '{key}' entry")
    ):
        checkpoint.load(path, training=True)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s["trainer"]["members"][0].pop("history"), "it has no 'trainer.members[0].history' entry"),
        (lambda s: s["trainer"].update(epoch="1"), "'trainer.epoch' is a str ('1'), expected int"),
        (lambda s: s["schedule"].update(t=None), "'schedule.t' is a NoneType (None), expected int"),
        (lambda s: s["rng"]["numpy"].pop("keys"), "it has no 'rng.numpy.keys' entry"),
        (
            lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
            "'rng.torch' is a torch.uint8 tensor of 3 elements, expected a CPU generator state",
        ),
        (
            lambda s: s["model"].update({"hidden1.linear.weight": [1.0, 2.0]}),
            "'model' must map parameter names to tensors, but 'hidden1.linear.weight' maps to a list",
        ),
        (lambda s: s.update(model={}), "'model' holds no tensors"),
    ],
    ids=["no history", "epoch a string", "t None", "no numpy keys", "short generator state", "a list", "empty model"],
)
def test_nested_entries_are_checked_too(change, problem, good: Path, tmp_path: Path):
    path = _changed(good, tmp_path / "x.pt", change)
    with pytest.raises(UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: ")) as info:
        checkpoint.load(path, training=True)
    assert problem in str(info.value)


def test_an_rng_state_that_cannot_be_restored_is_a_user_error(good: Path):
    state = checkpoint.load(good, training=True)
    state["rng"]["numpy"]["keys"] = state["rng"]["numpy"]["keys"][:5]  # the Mersenne Twister needs 624
    with pytest.raises(UserError, match="random number generator states cannot be restored"):
        checkpoint.restore_rng(state["rng"], [torch.Generator()])


def test_load_into_names_the_first_mismatch_and_counts_the_rest(good: Path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(2, 3)}
    with pytest.raises(UserError) as info:
        checkpoint.load_into(model, state, good)
    assert str(info.value) == (
        f"{good} does not fit this model: size mismatch for 0.weight: checkpoint [5, 4], model [3, 4] (and 3 more)"
    )  # 1.weight and 1.bias missing, 2.weight unexpected
    fitting = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    checkpoint.load_into(model, fitting, good)
    assert all(torch.equal(t, torch.ones_like(t)) for t in model.state_dict().values())


def test_an_invalid_config_in_an_evaluated_checkpoint_names_the_file(good: Path, tmp_path: Path):
    path = _changed(good, tmp_path / "x.pt", lambda s: s["config"].update(model="x"))
    with pytest.raises(
        UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: the config saved in it is invalid")
    ) as info:
        evaluate.run(make_config("mode=evaluate", f"evaluate.checkpoint={path}"), tmp_path / "eval")
    assert "model: expected a mapping, got 'x'" in str(info.value)


def test_a_transfer_source_without_hidden_layers_is_refused(good: Path, tmp_path: Path):
    path = _changed(
        good,
        tmp_path / "x.pt",
        lambda s: s.update(model={k: v for k, v in s["model"].items() if k.startswith("output.")}),
    )
    with pytest.raises(UserError, match=re.escape(f"transfer.source: {path} has no hidden layers to reuse")):
        loop.run(make_config(f"transfer.source={path}"), tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# JSON lines: metrics.jsonl and diagnostics.jsonl are appended to while runs go on

RECORDS = [{"epoch": 1, "val/loss": 0.5}, {"epoch": 2, "val/loss": 0.4}]


def _lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize(
    "torn", [b'{"epoch": 3, "val/lo', b'{"note": "caf\xc3', b"{"], ids=["mid-key", "mid-UTF-8 character", "one byte"]
)
def test_a_torn_last_line_is_left_out(torn: bytes, tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(RECORDS) + torn)
    assert read_jsonl(path) == RECORDS


def test_a_last_line_without_newline_that_parses_is_kept(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(RECORDS)[:-1])
    assert read_jsonl(path) == RECORDS


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (_lines(RECORDS[:1]) + b'{"epoch": 2, "val/lo\n' + _lines(RECORDS[1:]), 2),  # damage in the middle
        (_lines(RECORDS) + b'{"epoch": 3, "val/lo\n', 3),  # a whole line (newline written) cannot be torn
        (b"\n" + _lines(RECORDS) + b"\xc3\x28\n", 4),  # blank lines count; bytes that are not UTF-8
    ],
    ids=["middle", "last with newline", "not UTF-8"],
)
def test_a_damaged_line_is_an_error_naming_file_and_line(content: bytes, line: int, tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(
        UserError, match=re.escape(f"{path}, line {line}: not a JSON record (") + ".*; the file is damaged$"
    ):
        read_jsonl(path)


def test_a_report_reads_a_run_whose_metrics_are_being_appended(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(_lines(RECORDS) + b'{"epoch": 3, "val')
    found = RunDir(run).read()
    assert found["epochs"] == 2 and found["status"] == "running" and found["val/loss"] == 0.4


def test_the_report_and_plot_commands_name_a_damaged_metrics_file(tmp_path: Path):
    from dnnrun.insight import plots, report

    run = tmp_path / "run"
    loop.run(make_config("trainer.epochs=2", "trainer.diagnostics.plots=false"), run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0][:10] + "\n" + lines[1])  # the first record damaged, not torn
    assert report.main([str(run)]) == 2
    assert plots.main([str(run)]) == 2


# ---------------------------------------------------------------------------------------------
# The previous version: files that dnnrun wrote before one loop served single runs and members
# (tests/data/v1_*.pt: model.hidden=[8], optimizer=adam, two epochs on the synthetic set; the
# mid-epoch one stopped by SIGINT after step 31, the members' of trainer.seeds=[0,1])

V1 = Path(__file__).parent / "data"
V1_SETUP = ("model.hidden=[8]", "optimizer=adam", "trainer.epochs=3")


@pytest.mark.parametrize(
    "name, where",
    [("v1_single_last.pt", "after epoch 2 (step 54)"), ("v1_single_midepoch.pt", "during epoch 2, after step 31")],
)
def test_a_version_1_checkpoint_resumes_to_the_run_this_version_makes(name, where, tmp_path: Path):
    fresh = loop.run(make_config(*V1_SETUP), tmp_path / "fresh")
    resumed = loop.run(make_config(*V1_SETUP, f"trainer.resume={V1 / name}"), tmp_path / "resumed")
    assert f"resumed from {V1 / name} {where}" in (tmp_path / "resumed" / "run.log").read_text()
    assert resumed["status"] == "completed" and resumed["steps"] == fresh["steps"] == 81
    mine, theirs = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("resumed", "fresh"))
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in mine] == [
        {k: v for k, v in r.items() if not k.startswith("time/")} for r in theirs
    ]
    a, b = (last_weights(tmp_path / d) for d in ("resumed", "fresh"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_version_1_members_checkpoint_is_refused_with_the_reason(tmp_path: Path):
    path = V1 / "v1_members_last.pt"
    with pytest.raises(UserError, match=re.escape(f"{path} holds the members of trainer.seeds as dnnrun wrote them")):
        loop.run(make_config(*V1_SETUP[:1], "trainer.seeds=[0,1]", f"trainer.resume={path}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_a_newer_version_is_refused(good: Path, tmp_path: Path):
    path = _changed(good, tmp_path / "x.pt", lambda s: s.update(version=99))
    with pytest.raises(UserError, match=re.escape(f"{path} is a dnnrun checkpoint of version 99; this dnnrun reads")):
        checkpoint.load(path, training=True)


def test_a_weight_of_no_dimensions_is_refused_not_a_traceback(good: Path, tmp_path: Path):
    path = _changed(good, tmp_path / "x.pt", lambda s: s["model"].update({"hidden1.linear.weight": torch.zeros(())}))
    with pytest.raises(UserError, match=re.escape(f"{path} does not fit this model")):
        loop.run(make_config(*SETUP[1:], "trainer.epochs=2", f"trainer.resume={path}"), tmp_path / "run")


def test_a_setting_added_since_a_checkpoint_reads_as_what_the_checkpoint_did():
    """data.val_from came after version-1 files: missing, it is 'random' (what they did); 'end' is a change."""
    from dnnrun.training.checkpointing import config_changes

    saved = {"data": {"name": "digits", "val_size": 0.1}}
    assert config_changes(saved, {"data": {"name": "digits", "val_size": 0.1, "val_from": "random"}}) == []
    assert config_changes(saved, {"data": {"name": "digits", "val_size": 0.1, "val_from": "end"}}) == [
        "data.val_from: 'random' in the checkpoint, 'end' now"
    ]
