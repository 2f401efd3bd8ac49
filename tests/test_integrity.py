"""Checkpoints and exports whose tensors were damaged after they were written, or whose contents
(weights, preprocessing, nesting, tensor shapes) no dnnrun would write: every reader goes through
checkpoint.load (zoo's model.weights through zoo.load_weights) and gets one line naming the file and
what is wrong, never a traceback, a NaN prediction or an allocation of what a crafted shape claims.
"""

from __future__ import annotations

import re
import struct
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import compose_raw, make_config
from dnnrun.errors import UserError
from dnnrun.inference import export
from dnnrun.models.zoo import ZooConfig, load_weights
from dnnrun.store import checkpoint
from dnnrun.training import loop

SETUP = ("model.hidden=[32,16]", "optimizer=adam")  # adam: tensors nested in the optimizer's state


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real training checkpoint (one epoch on the synthetic set: 32 features, 4 classes, standardized)."""
    run = tmp_path_factory.mktemp("good") / "run"
    loop.run(make_config(*SETUP, "trainer.epochs=1"), run)
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def exported(good: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "weights.safetensors"
    assert export.main([str(good), "--out", str(out)]) == 0
    return out


def _rewritten(good: Path, out: Path, change, seal: bool = True) -> Path:
    """`good` changed by `change(state)` and saved with torch.save (still weights_only-loadable); with
    `seal`, with the checksum of its tensors as changed (a file made so, not damaged on the way)."""
    state = torch.load(good, weights_only=True)
    change(state)
    if seal:
        state[checkpoint.CHECKSUM] = checkpoint.checksum(state)
    torch.save(state, out)
    torch.load(out, weights_only=True)  # the premise: the file itself loads
    return out


def _export_rewritten(exported: Path, out: Path, change, seal: bool = True) -> Path:
    """The export changed by `change(tensors, metadata)`, saved with safetensors' own save_file."""
    with safe_open(str(exported), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    if seal:
        metadata[checkpoint.CHECKSUM] = checkpoint.checksum(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _refused(path: Path, problem: str) -> None:
    with pytest.raises(UserError) as info:
        checkpoint.load(path)
    assert str(info.value) == f"{path} {problem}"


def _flip_bit(t: torch.Tensor) -> None:
    t.view(-1).view(torch.uint8)[t.element_size() * (t.numel() // 2)] ^= 0x10


# ---------------------------------------------------------------------------------------------
# Checksums


def test_a_byte_flipped_in_a_saved_tensor_is_refused_as_damage(good: Path, tmp_path: Path, capsys):
    path = tmp_path / "last.pt"
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:  # torch.save's zip: each storage a record of its own, stored as is
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert record.compress_type == zipfile.ZIP_STORED
    name, extra = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name + extra + record.file_size // 2] ^= 0x01
    path.write_bytes(data)
    torch.load(path, weights_only=True)  # the premise: torch reads it (it checks no CRC), only the checksum can tell
    _refused(path, "is damaged: checksum differs")
    assert export.main([str(path), "--out", str(tmp_path / "w.safetensors")]) == 2  # the CLI's exit code
    assert f"error: {path} is damaged: checksum differs" in capsys.readouterr().err
    with pytest.raises(UserError, match=re.escape(f"{path} is damaged: checksum differs")):
        loop.run(make_config(*SETUP, "trainer.epochs=2", f"trainer.resume={path}"), tmp_path / "run")


@pytest.mark.parametrize(
    "where",
    [
        lambda s: s["model"]["hidden2.linear.bias"],
        lambda s: next(iter(s["optimizer"]["state"].values()))["exp_avg_sq"],  # nested in the optimizer's state
        lambda s: s["rng"]["shuffle"][0],  # in a list
        lambda s: s["inputs"]["std"],
    ],
    ids=["weight", "optimizer state", "list item", "preprocessing"],
)
def test_a_bit_flipped_in_any_tensor_is_refused(where, good: Path, tmp_path: Path):
    path = _rewritten(good, tmp_path / "x.pt", lambda s: _flip_bit(where(s)), seal=False)
    with pytest.raises(UserError, match=re.escape(f"{path} is damaged: checksum differs")):
        checkpoint.load(path, training=True)


def test_the_checksum_covers_each_bit_place_and_type_and_not_the_dict_order():
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool):
        t = torch.arange(12).reshape(3, 4).to(dtype)
        flipped = t.clone()
        flipped.view(-1).view(torch.uint8)[5] ^= 0x01
        assert checkpoint.checksum({"a": [t]}) != checkpoint.checksum({"a": [flipped]}), dtype
    a, b = torch.zeros(3), torch.ones(3)
    assert checkpoint.checksum({"x": a, "y": {0: b}}) == checkpoint.checksum({"y": {0: b}, "x": a})
    assert checkpoint.checksum({"x": a, "y": b}) != checkpoint.checksum({"x": b, "y": a})
    assert checkpoint.checksum({"x": a}) != checkpoint.checksum({"x": a.reshape(3, 1)})
    assert checkpoint.checksum({"x": a}) != checkpoint.checksum({"x": a.double()})


def test_a_version_2_checkpoint_without_its_checksum_is_refused_and_version_1_loads(good: Path, tmp_path: Path):
    path = _rewritten(good, tmp_path / "x.pt", lambda s: s.pop(checkpoint.CHECKSUM), seal=False)
    _refused(path, "is not a usable dnnrun checkpoint: it has no 'checksum' entry")
    v1 = Path(__file__).parent / "data" / "v1_single_last.pt"
    assert checkpoint.CHECKSUM not in torch.load(v1, weights_only=True)
    assert checkpoint.load(v1, training=True)["version"] == 2  # upgraded


def test_saving_a_loaded_state_writes_the_checksum_of_its_tensors_now(good: Path, tmp_path: Path):
    state = checkpoint.load(good)
    state["model"]["output.bias"] = state["model"]["output.bias"] + 1
    checkpoint.save(tmp_path / "x.pt", state)  # its old checksum is replaced, not kept
    assert torch.equal(checkpoint.load(tmp_path / "x.pt")["model"]["output.bias"], state["model"]["output.bias"])


def test_an_export_carries_the_checksum_of_its_tensors_and_a_flipped_byte_is_refused(exported: Path, tmp_path: Path):
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["version"] == "2" and metadata["checksum"] == checkpoint.checksum(tensors)
    assert "__inputs__.std" in tensors  # the preprocessing's tensors are covered too
    path = tmp_path / "x.safetensors"
    data = bytearray(exported.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data (safetensors: 8 bytes of header length, the header, the data)
    path.write_bytes(data)
    _refused(path, "is damaged: checksum differs")
    unsealed = _export_rewritten(exported, tmp_path / "y.safetensors", lambda t, m: m.pop("checksum"), seal=False)
    _refused(unsealed, "is not a usable dnnrun checkpoint: its metadata has no 'checksum' entry")


def test_an_export_from_before_checksums_loads(exported: Path, tmp_path: Path):
    def before(tensors, metadata):
        del metadata["version"], metadata["checksum"]

    path = _export_rewritten(exported, tmp_path / "x.safetensors", before, seal=False)
    assert checkpoint.load(path)["model"].keys() == checkpoint.load(exported)["model"].keys()


# ---------------------------------------------------------------------------------------------
# Weights and preprocessing


@pytest.mark.parametrize(
    ("value", "problem"),
    [(float("nan"), "holds 1 NaN and 0 infinite of its 512 values"), (float("-inf"), "holds 0 NaN and 1 infinite")],
    ids=["nan", "inf"],
)
def test_weights_that_are_not_finite_are_refused_with_their_name(value, problem, good: Path, exported, tmp_path):
    def poisoned(s):
        s["model"]["hidden2.linear.weight"][3, 5] = value

    path = _rewritten(good, tmp_path / "x.pt", poisoned)
    prefix = f"{path} is not a usable dnnrun checkpoint: weight 'hidden2.linear.weight' "
    with pytest.raises(UserError, match=re.escape(prefix + problem)):
        checkpoint.load(path)
    path = _export_rewritten(exported, tmp_path / "x.safetensors", lambda t, m: poisoned({"model": t}))
    with pytest.raises(UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: weight 'hidden2")):
        checkpoint.load(path)


def _set(key: str, value):
    def change(s):
        s["inputs"][key] = value

    return change


def _std_zero(s):
    s["inputs"]["std"][7] = 0.0


INPUTS = {
    "std with a zero": (_std_zero, "'inputs.std' holds 1 of 32 values <= 0: scaling=standardize divides by it"),
    "std not finite": (
        lambda s: s["inputs"]["std"].__setitem__(0, float("inf")),
        "'inputs.std' holds 0 NaN and 1 infinite of its 32 values",
    ),
    "mean of another shape": (
        _set("mean", torch.zeros(3)),
        "'inputs.mean' has shape [3], expected the inputs' shape [32]",
    ),
    "mean missing": (
        _set("mean", None),
        "'inputs.mean' is missing: scaling=standardize needs the mean and std of the training inputs",
    ),
    "integer std": (_set("std", torch.ones(32, dtype=torch.int64)), "'inputs.std' is a torch.int64 tensor"),
    "shape with a zero": (_set("shape", [0]), "'inputs.shape' is a list ([0]), expected 1 to 4 sizes > 0"),
    "shape not ints": (_set("shape", [32.0]), "'inputs.shape' is a list ([32.0]), expected 1 to 4 sizes > 0"),
    "shape too long": (_set("shape", [1] * 5), "'inputs.shape' is a list ([1, 1, 1, 1, 1]), expected 1 to 4"),
    "shape too large": (
        _set("shape", [3, 2**15, 2**15]),
        "'inputs.shape' is a list ([3, 32768, 32768]), expected 1 to 4 sizes > 0 (features, or channels, height "
        "and width) of at most 268,435,456 values in all",
    ),
    "unknown scaling": (_set("scaling", "log"), "'inputs.scaling' is 'log', expected one of none, unit, standardize"),
    "unit scaling by 0": (
        lambda s: s["inputs"].update(scaling="unit", max_value=0.0),
        "'inputs.max_value' is 0.0: scaling=unit divides by it",
    ),
    "class name not a string": (_set("class_names", [0, 1, 2, 3]), "'inputs.class_names' holds a int (0)"),
}


@pytest.mark.parametrize("case", INPUTS)
def test_preprocessing_that_cannot_apply_is_refused(case, good: Path, tmp_path: Path):
    change, problem = INPUTS[case]
    path = _rewritten(good, tmp_path / "x.pt", change)
    with pytest.raises(UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: {problem}")):
        checkpoint.load(path)


def test_the_preprocessing_as_read_from_a_good_export_passes(exported: Path):
    inputs = checkpoint.load(exported)["inputs"]  # the control: the cases below fail for their change only
    assert inputs["shape"] == [32] and inputs["mean"].shape == inputs["std"].shape == (32,)


def _inputs_json(text: str):
    def change(tensors, metadata):
        metadata["inputs"] = text

    return change


EXPORTS = {
    "inputs not JSON": (_inputs_json("{scaling"), "its metadata 'inputs' is not valid JSON (Expecting property"),
    "inputs a JSON list": (_inputs_json("[1, 2]"), "its metadata 'inputs' is a list ([1, 2]), expected a JSON object"),
    "config nested 200,000 levels": (
        lambda t, m: m.update(config='{"a":' * 200_000 + "{}" + "}" * 200_000),
        "its metadata 'config' nests more levels than JSON can be read",
    ),
    "config nested 100 levels": (  # readable JSON, but deeper than any config (OmegaConf recurses per level)
        lambda t, m: m.update(config='{"a":' * 100 + "{}" + "}" * 100),
        "'config' nests dicts and lists more than 32 levels deep",
    ),
    "no mean tensor": (
        lambda t, m: t.pop("__inputs__.mean"),
        "'inputs.mean' is missing: scaling=standardize needs the mean and std",
    ),
    "std tensor of another shape": (
        lambda t, m: t.update({"__inputs__.std": torch.ones(4, 8)}),
        "'inputs.std' has shape [4, 8], expected the inputs' shape [32]",
    ),
    "std tensor with a zero": (
        lambda t, m: t["__inputs__.std"].__setitem__(0, 0.0),
        "'inputs.std' holds 1 of 32 values <= 0",
    ),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_a_crafted_export_is_refused_in_one_line(case, exported: Path, tmp_path: Path):
    change, problem = EXPORTS[case]
    path = _export_rewritten(exported, tmp_path / "x.safetensors", change)
    with pytest.raises(UserError) as info:
        checkpoint.load(path)
    assert str(info.value).startswith(f"{path} is not a usable dnnrun checkpoint: {problem}")
    assert "\n" not in str(info.value)


def _save_deep(state: dict, out: Path) -> None:
    """torch.save of a state nested deeper than Python's default recursion limit lets pickle write."""

    def save():
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(10**6)
        try:
            torch.save(state, out)
        finally:
            sys.setrecursionlimit(limit)

    size = threading.stack_size(2**28)
    try:
        thread = threading.Thread(target=save)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(size)


def test_a_checkpoint_config_nested_very_deep_is_refused(good: Path, tmp_path: Path):
    state = torch.load(good, weights_only=True)
    deep: dict = {}
    for _ in range(100_000):
        deep = {"a": deep}
    state["config"] = deep  # the checksum, of the tensors only, still holds
    _save_deep(state, tmp_path / "x.pt")
    _refused(
        tmp_path / "x.pt", "is not a usable dnnrun checkpoint: 'config' nests dicts and lists more than 32 levels deep"
    )


# ---------------------------------------------------------------------------------------------
# Tensors that claim more than they hold (weights_only-loadable: torch.save keeps the view over one value)


# 2**36 values, 256 GiB (the most MAX_ELEMENTS allows): should the check go, malloc refuses it at once
CLAIMED = 2**36


@pytest.mark.parametrize(
    "where",
    [
        lambda s, t: s["model"].update({"hidden2.linear.bias": t}),
        lambda s, t: next(iter(s["optimizer"]["state"].values())).update(exp_avg=t),
    ],
    ids=["weight", "optimizer state"],
)
def test_an_expanded_tensor_is_refused_before_anything_copies_it(where, good: Path, tmp_path: Path, capsys):
    path = _rewritten(good, tmp_path / "x.pt", lambda s: where(s, torch.zeros(1).expand(CLAIMED)), seal=False)
    problem = f"claims {CLAIMED:,} values (shape [{CLAIMED}]) but its storage holds 1: an expanded tensor"
    with pytest.raises(UserError, match=re.escape(f"{path} is not a usable dnnrun checkpoint: '")) as info:
        checkpoint.load(path, training=True)
    assert problem in str(info.value)
    out = tmp_path / "w.safetensors"
    assert export.main([str(path), "--out", str(out)]) == 2 and not out.exists()
    assert problem in capsys.readouterr().err


def test_a_tensor_of_an_absurd_element_count_is_refused(good: Path, tmp_path: Path):
    path = _rewritten(
        good, tmp_path / "x.pt", lambda s: s["model"].update(w=torch.zeros(1).expand(2**20, 2**20)), seal=False
    )
    _refused(
        path,
        "is not a usable dnnrun checkpoint: 'model.w' claims 1,099,511,627,776 values (shape [1048576, 1048576]), "
        "more than 68,719,476,736",
    )


# ---------------------------------------------------------------------------------------------
# model=zoo: model.weights, a file of torchvision's names


@pytest.mark.parametrize(
    ("suffix", "tensor", "problem"),
    [
        (".safetensors", torch.tensor([1.0, float("nan")]), "weight 'fc.bias' holds 1 NaN and 0 infinite"),
        (".pt", torch.tensor([float("inf"), 1.0]), "weight 'fc.bias' holds 0 NaN and 1 infinite"),
        (".pt", torch.zeros(1).expand(CLAIMED), f"'fc.bias' claims {CLAIMED:,} values"),
    ],
    ids=["nan safetensors", "inf pt", "expanded pt"],
)
def test_zoo_weights_are_checked_as_checkpoints_are(suffix, tensor, problem, tmp_path: Path):
    path = tmp_path / f"weights{suffix}"
    state = {"fc.weight": torch.ones(2, 3), "fc.bias": tensor}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(UserError, match=re.escape(f"model.weights: {path} cannot be used: {problem}")):
        load_weights(ZooConfig(name="zoo", weights=str(path)))
    save_file({"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2)}, str(path.with_suffix(".safetensors")))
    assert load_weights(ZooConfig(name="zoo", weights=str(path.with_suffix(".safetensors")))).keys() == state.keys()


# ---------------------------------------------------------------------------------------------
# dnnrun-export: the weights are those of the model the config describes


def _batchnorm(s):
    s["config"]["norm"] = compose_raw("norm=batchnorm")["norm"]


MISFITS = {
    "a tensor of no layer": (lambda s: s["model"].update(extra=torch.zeros(2)), "extra is in the checkpoint but not"),
    "other classes": (
        _set("class_names", ["a", "b", "c"]),
        "size mismatch for output.weight: checkpoint [4, 16], model [3, 16]",
    ),
    "other inputs": (
        lambda s: s["inputs"].update(shape=[16], mean=torch.zeros(16), std=torch.ones(16)),
        "size mismatch for hidden1.linear.weight: checkpoint [32, 32], model [32, 16]",
    ),
    "norm layers the weights lack": (_batchnorm, "hidden1.norm.weight is missing from the checkpoint"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_export_refuses_weights_that_do_not_fit_the_config(case, good: Path, tmp_path: Path, capsys):
    change, problem = MISFITS[case]
    path = _rewritten(good, tmp_path / "x.pt", change)
    checkpoint.load(path)  # the premise: the file itself is whole and readable
    out = tmp_path / "w.safetensors"
    assert export.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path} does not fit this model: {problem}" in err, err
    assert not out.exists()


def test_export_refuses_a_checkpoint_whose_config_is_invalid(good: Path, tmp_path: Path, capsys):
    path = _rewritten(good, tmp_path / "x.pt", lambda s: s["config"].update(model="x"))
    assert export.main([str(path), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a usable dnnrun checkpoint: the config saved in it is invalid" in err, err
    assert "model: expected a mapping, got 'x'" in err
