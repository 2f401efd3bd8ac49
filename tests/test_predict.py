"""Using a trained model without its data set: dnnrun.load(...).predict(x) and mode=predict, from
what the checkpoint holds (the weights, the config and the preprocessing fitted on the training set)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import dnnrun
from conftest import make_config, run_cli
from dnnrun.data.datasets import DataConfig, load as load_data
from dnnrun.errors import DataError, UserError
from dnnrun.store import checkpoint
from dnnrun.training import loop

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An MLP with dropout on the digits, two epochs."""
    run = tmp_path_factory.mktemp("trained")
    loop.run(make_config("regularizer=[dropout]", "trainer.epochs=2", data="digits"), run)
    return run


def _raw_test_split():
    """The digits' test split as the set has it: pixel values 0..16, images (N, 1, 8, 8)."""
    data = load_data(DataConfig(name="digits", scaling="none"), CPU)
    return data.test.x, data.test.y


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_loaded_model_applies_its_own_preprocessing_to_raw_inputs(trained: Path):
    import json

    model = dnnrun.load(trained)
    x, y = _raw_test_split()
    probs = model.predict(x.numpy())  # numpy in, numpy out
    assert isinstance(probs, np.ndarray) and probs.shape == (len(y), 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    summary = json.loads((trained / "summary.json").read_text())
    assert (probs.argmax(1) == y.numpy()).mean() == pytest.approx(summary["test"]["test/acc"])
    rows = model.predict(x.reshape(len(x), -1))  # rows of 64 values do as well; a tensor in, a tensor out
    assert isinstance(rows, torch.Tensor) and torch.allclose(rows, torch.from_numpy(probs))
    assert model.classes == [str(c) for c in range(10)] and model.shape == (1, 8, 8)
    assert model.config.data.name == "digits" and not model.module.training


def test_mode_predict_writes_predictions_csv_from_npy_npz_and_csv(trained: Path, tmp_path: Path):
    x, _ = _raw_test_split()
    x = x[:20].numpy()
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x, other=np.zeros(3))
    header = ",".join(f"pixel{i}" for i in range(64))
    np.savetxt(tmp_path / "x.csv", x.reshape(20, 64), delimiter=",", header=header, comments="")
    expected = dnnrun.load(trained).predict(x)
    for name in ("x.npy", "x.npz", "x.csv"):
        run = tmp_path / f"predict_{name}"
        result = run_cli(
            "mode=predict",
            f"predict.checkpoint={trained}",
            f"predict.input={tmp_path / name}",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        rows = _rows(run / "predictions.csv")
        assert list(rows[0]) == ["input", "predicted", "probability", *[f"p_{c}" for c in range(10)]]
        assert [r["input"] for r in rows] == [str(i) for i in range(20)]
        assert [int(r["predicted"]) for r in rows] == expected.argmax(1).tolist()
        assert np.allclose([[float(r[f"p_{c}"]) for c in range(10)] for r in rows], expected, atol=1e-6)


def test_mc_dropout_predictions_add_their_spread_and_entropy(trained: Path, tmp_path: Path):
    x, _ = _raw_test_split()
    np.save(tmp_path / "x.npy", x[:10].numpy())
    result = run_cli(
        "mode=predict",
        f"predict.checkpoint={trained}",
        f"predict.input={tmp_path / 'x.npy'}",
        "predict.mc_samples=8",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(tmp_path / "run" / "predictions.csv")
    assert list(rows[0])[:5] == ["input", "predicted", "probability", "std", "entropy"]
    assert any(float(r["std"]) > 0 for r in rows)  # the passes' dropout masks differ
    for r in rows:
        p = np.array([float(r[f"p_{c}"]) for c in range(10)])
        assert float(r["entropy"]) == pytest.approx(-(p * np.log(np.clip(p, 1e-12, None))).sum(), abs=1e-5)


def test_a_folder_of_images_and_an_export_predict_as_the_checkpoint_does(tmp_path: Path):
    from PIL import Image

    from dnnrun.inference.export import main as export

    run = tmp_path / "cnn"
    loop.run(make_config("model=cnn", "model.channels=[4]", "trainer.epochs=1", data="digits"), run)
    x, _ = _raw_test_split()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(x[i, 0].numpy().astype(np.uint8)).save(folder / f"digit{i}.png")  # raw values 0..16
    result = run_cli(
        "mode=predict",
        f"predict.checkpoint={run / 'checkpoints' / 'best.pt'}",
        f"predict.input={folder}",
        f"hydra.run.dir={tmp_path / 'predicted'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = _rows(tmp_path / "predicted" / "predictions.csv")
    assert [r["input"] for r in rows] == [f"digit{i}.png" for i in range(5)]
    expected = dnnrun.load(run).predict(x[:5])
    assert [int(r["predicted"]) for r in rows] == expected.argmax(1).tolist()
    assert export([str(run)]) == 0
    exported = dnnrun.load(run / "checkpoints" / "best.safetensors")  # the preprocessing travels with the weights
    assert torch.allclose(exported.predict(x[:5]), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["features", "nan", "size", "file"])
def test_bad_inputs_are_refused_naming_the_file_and_what_was_expected(trained: Path, tmp_path: Path, case):
    from PIL import Image

    if case == "features":
        np.save(path := tmp_path / "x.npy", np.zeros((3, 10)))
        expected = f"predict.input {path}: examples of shape (10,); the model takes (1, 8, 8) or rows of 64 values"
    elif case == "nan":
        x = np.zeros((3, 64))
        x[1, 5] = np.nan
        np.save(path := tmp_path / "x.npy", x)
        expected = f"predict.input {path}: example 1 (counting from 0) holds NaN or infinite values"
    elif case == "size":
        (path := tmp_path / "images").mkdir()
        Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(path / "a.png")
        expected = f"predict.input: {path / 'a.png'} is 12 x 10 pixels; the model takes 8 x 8"
    else:
        path = tmp_path / "missing.npy"
        expected = f"predict.input: no file or folder at {path}"
    run = tmp_path / "run"
    result = run_cli(
        "mode=predict", f"predict.checkpoint={trained}", f"predict.input={path}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr
    assert not run.exists()


def test_mode_predict_needs_its_checkpoint_and_input_and_old_checkpoints_are_refused(trained: Path, tmp_path: Path):
    result = run_cli("mode=predict", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "predict.checkpoint: mode=predict needs the model" in result.stderr
    assert "predict.input: mode=predict needs the examples" in result.stderr
    old = checkpoint.load(trained / "checkpoints" / "best.pt")
    del old["inputs"]  # as checkpoints were written before they held their preprocessing
    checkpoint.save(tmp_path / "old.pt", old)
    with pytest.raises(UserError, match="holds no preprocessing .* Evaluate it with mode=evaluate"):
        dnnrun.load(tmp_path / "old.pt")
    with pytest.raises(DataError):
        dnnrun.load(trained).predict(np.zeros((2, 3)))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_onnx_export_computes_what_pytorch_does_from_raw_inputs(model: str, tmp_path: Path):
    import json

    import onnx
    import onnxruntime

    from dnnrun.inference.export import main as export

    run = tmp_path / "run"
    shape = ["model=cnn", "model.channels=[4]", "norm=batchnorm"] if model == "cnn" else ["regularizer=[dropout]"]
    loop.run(make_config(*shape, "trainer.epochs=1", data="digits"), run)
    assert export([str(run), "--format", "onnx"]) == 0
    path = run / "checkpoints" / "best.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 17, (7, 1, 8, 8)).float().numpy()  # raw pixel values, any batch size
    (probs,) = session.run(["probabilities"], {"inputs": x})
    expected = dnnrun.load(run).predict(x)
    assert probs.shape == (7, 10) and np.abs(probs - expected).max() < 1e-5
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["class_names"]) == [str(c) for c in range(10)]
    assert json.loads(metadata["dnnrun_config"])["model"]["name"] == model


def test_train_and_load_in_a_notebook(tmp_path: Path):
    summary = dnnrun.fit(
        ["act=elu", "trainer.epochs=1", "trainer.progress=false", "trainer.diagnostics.plots=false"],
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed" and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert dnnrun.load(tmp_path / "run").config.act.name == "elu"
