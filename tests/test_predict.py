"""Using a trained model without its data set: dnnrun.load(...).predict(x) and mode=predict, from
what the checkpoint holds (the weights, the config and the preprocessing fitted on the training set)."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import dnnrun
from conftest import make_config, run_cli
from dnnrun.data.datasets import DataConfig, load as load_data
from dnnrun.errors import DataError, UserError
from dnnrun.inference import predict
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
        Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(png := io.BytesIO(), "PNG")
        data = png.getvalue()
        (path / "a.png").write_bytes(data[: data.index(b"IDAT") + 4])  # no pixels: the size is refused from the header
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


@pytest.fixture(scope="module")
def model(trained: Path) -> predict.Model:
    return dnnrun.load(trained)


class _Mkdir:
    """Unpickled, it makes a folder: an object array holding it shows whether a reader unpickles."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _npy_header(path: Path, shape: tuple[int, ...], data: bytes = b"") -> None:
    """A .npy file (format 1.0) whose header, written by hand, claims float64 of `shape`; then `data`."""
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"  # magic, version and length take 10 bytes; 64-aligned
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """An 8 x 8 PNG whose header (IHDR, its CRC made to match) claims width x height pixels."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(png := io.BytesIO(), "PNG")
    data = bytearray(png.getvalue())  # 8 bytes of signature; IHDR: length, b"IHDR", width, height, ..., CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    path.write_bytes(data)


RECORDS = np.zeros(3, dtype=[("a", "<f8"), ("b", "<i4")])


@pytest.mark.parametrize(
    "case",
    ["records", "strings", "pickle", "huge", "truncated", "shape", "npz", "csv"]
    + ["bomb", "over_limit", "eps", "frames", "alpha", "16bit"],
)
def test_unsafe_or_unfit_inputs_are_refused_before_their_data_is_read(
    model: predict.Model, tmp_path: Path, monkeypatch, case: str
):
    from PIL import Image

    path, image = tmp_path / f"x.{case if case in ('npz', 'csv') else 'npy'}", tmp_path / "images" / "a.png"
    image.parent.mkdir()
    if case == "records":
        np.save(path, RECORDS)
        expected = f"{path} holds records (fields a, b) of dtype |V12, not numbers: refused unread"
    elif case == "strings":
        np.save(path, np.full((2, 64), "1"))
        expected = f"{path} holds strings of dtype <U1, not numbers: refused unread"
    elif case == "pickle":
        np.save(path, np.array([_Mkdir(tmp_path / "unpickled")] * 2, dtype=object), allow_pickle=True)
        expected = f"{path} holds Python objects (a pickle) of dtype |O, not numbers: refused unread"
    elif case == "huge":
        _npy_header(path, (1 << 40, 64))
        expected = f"{path} holds {1 << 46:,} values, more than the {predict.MAX_INPUT_VALUES:,} one input may hold"
    elif case == "truncated":
        _npy_header(path, (1000, 64), bytes(16))
        expected = f"{path} claims an array of shape (1000, 64) and dtype <f8 (512,000 bytes), but 16 bytes follow"
    elif case == "shape":  # checked from the header: the file holds no data
        _npy_header(path, (3, 10))
        expected = f"predict.input {path}: examples of shape (10,); the model takes (1, 8, 8) or rows of 64 values"
    elif case == "npz":
        np.savez(path, x=RECORDS)
        expected = f"{path} (array x) holds records (fields a, b)"
    elif case == "csv":  # one field over the csv module's limit (131 072 characters)
        path.write_text("1" * 200_000 + "\n")
        expected = f"{path}, line 1 is longer than 5,120 characters"
    elif case == "bomb":
        _png_claiming(image, 100_000, 100_000)
        expected = f"{image} claims more pixels in its header than Pillow's decompression-bomb limit of "
        expected += f"{Image.MAX_IMAGE_PIXELS:,}"
    elif case == "over_limit":  # over Pillow's limit, under twice it: Pillow itself only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
        expected = f"{image} claims more pixels in its header than Pillow's decompression-bomb limit of 40 "
    elif case == "eps":  # Pillow would read it as EPS, with Ghostscript
        image.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n")
        expected = f"{image} is not an image dnnrun reads (PNG, JPEG, BMP, GIF, TIFF, WEBP)"
    elif case == "frames":
        frames = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (0, 255)]
        frames[0].save(image := image.with_suffix(".gif"), save_all=True, append_images=frames[1:])
        expected = f"{image} holds several frames; the model takes one image per file"
    elif case == "alpha":
        Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8)).save(image)  # RGBA, every pixel transparent
        expected = f"{image} has transparent pixels; the model takes opaque grey images"
    else:
        Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(image)
        expected = f"{image} has pixels of mode I;16 (Pillow's name); dnnrun reads 8-bit grey and colour images only"
    with pytest.raises(UserError) as refused:
        predict.read(path if path.exists() else image.parent, model)
    assert expected in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "unpickled").exists()


def test_images_of_the_other_colour_are_converted_and_the_log_says_so(model: predict.Model, tmp_path: Path, caplog):
    from PIL import Image

    # A stand-in for a model trained on RGB images of 8 x 8: reading looks only at the shape a model takes
    rgb_model = predict.Model(
        model.module, model.config, dataclasses.replace(model.preprocess, shape=(3, 8, 8)), CPU, model.source
    )
    x, _ = _raw_test_split()
    (rgb := tmp_path / "rgb").mkdir()
    (grey := tmp_path / "grey").mkdir()
    for i, pixels in enumerate(x[:2, 0].numpy().astype(np.uint8)):
        Image.fromarray(np.stack([pixels] * 3, -1)).save(rgb / f"{i}.png")  # grey values in R, G and B
        Image.fromarray(pixels).save(grey / f"{i}.png")
    with caplog.at_level(logging.INFO, logger="dnnrun"):
        assert torch.equal(predict.read(grey, model)[0], x[:2])
        assert not caplog.text  # nothing to convert, nothing said
        assert torch.equal(predict.read(rgb, model)[0], x[:2])  # L = 0.299 R + 0.587 G + 0.114 B: the grey value
        assert f"2 of the 2 images in {rgb} are colour (0.png first): read as grey" in caplog.text
        caplog.clear()
        assert torch.equal(predict.read(grey, rgb_model)[0], x[:2].expand(-1, 3, -1, -1))
        assert f"2 of the 2 images in {grey} are grey (0.png first): read as RGB" in caplog.text


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
