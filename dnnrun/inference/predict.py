"""Using a trained model: `dnnrun.load` in Python, `dnnrun mode=predict` on the command line.

A checkpoint (or an export) holds the model's weights, the config it was trained with, and the
preprocessing fitted on its training set (`inputs`: scaling and its statistics, one example's
shape, the classes' names), so a model applies to new raw inputs, pixels as the data set has them,
without its data set:

    import dnnrun
    model = dnnrun.load("outputs/2026-11-30/12-00-00")     # a run directory (its best.pt) or a file
    probabilities = model.predict(images)                  # (N, classes), preprocessing applied
    model.classes, model.config.model, model.module        # names, the run's config, the nn.Module

`dnnrun mode=predict predict.checkpoint=PATH predict.input=FILE` reads a .npy, .npz or .csv array
(one example per row, or per first axis) or a folder of image files, and writes predictions.csv
into its run directory: the predicted class, its probability and every class's probability; with
predict.mc_samples=K the mean of K passes with dropout on (MC dropout), the std of the predicted
class's probability over the passes and the predictive entropy.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dnnrun.config.run_config import RunConfig
from dnnrun.data.datasets import Preprocess
from dnnrun.errors import DataError, UserError
from dnnrun.inference import evaluate
from dnnrun.models import registry as model_mod
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, atomic_write
from dnnrun.training import runtime

log = logging.getLogger("dnnrun")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Pillow's readers of IMAGE_FILES, the only ones tried whatever a file holds (its EPS reader runs Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Pillow's modes of the images read: 8-bit (or 1-bit) grey, and 8-bit colour (a palette's too)
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# What one predict.input may hold, checked before it is read: predict holds all of it in memory at
# once, as float32 (N, *shape) and again preprocessed. 2**28 values are 1 GiB as float32 (60 000
# Fashion-MNIST images are 47M values); more is for dnnrun.load(...).predict in a loop over parts.
MAX_INPUT_VALUES = 1 << 28
NUMBERS = "uif"  # numpy's kinds of the dtypes read: unsigned and signed integers, floats (of at most 64 bits)
_NOT_NUMBERS = {  # what an array of another kind holds, for the message that refuses it
    "b": "booleans",
    "c": "complex numbers",
    "O": "Python objects (a pickle)",
    "U": "strings",
    "S": "bytes",
    "M": "dates",
    "m": "time spans",
}


class Model:
    """A trained model, ready to apply: `predict(x)` takes raw inputs (N, *shape) or rows (N,
    features), as numpy arrays or tensors, and returns class probabilities of the same kind."""

    def __init__(
        self, module: torch.nn.Module, config: RunConfig, preprocess: Preprocess, device: torch.device, source: Path
    ):
        self.module, self.config, self.preprocess, self.device, self.source = module, config, preprocess, device, source

    @property
    def classes(self) -> list[str]:
        return list(self.preprocess.class_names)

    @property
    def shape(self) -> tuple[int, ...]:
        """One example's shape as the model takes it: (C, H, W), or (features,)."""
        return tuple(self.preprocess.shape)

    def inputs(self, x: np.ndarray | torch.Tensor, what: str = "the inputs") -> torch.Tensor:
        """Raw examples as a float tensor (N, *shape) on the model's device, checked: their shape
        (rows of the right length are reshaped; a grey image may lack its channel axis) and values."""
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if not (
            t.dtype.is_floating_point or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        ):
            raise DataError(f"{what}: {t.dtype} values; expected numbers")
        t = t.float()
        shape, n = self.shape, (len(t) if t.ndim else 0)
        if tuple(t.shape[1:]) == shape:
            pass
        elif t.ndim == 2 and t.shape[1] == math.prod(shape):
            t = t.reshape(n, *shape)
        elif len(shape) == 3 and shape[0] == 1 and tuple(t.shape[1:]) == shape[1:]:
            t = t.unsqueeze(1)
        else:
            rows = f" or rows of {math.prod(shape)} values" if len(shape) > 1 else ""
            raise DataError(
                f"{what}: examples of shape {tuple(t.shape[1:]) if t.ndim else ()}; the model takes "
                f"{shape}{rows}, one example per row (as it was trained on {self.config.data.name})"
            )
        bad = (~torch.isfinite(t)).reshape(n, -1).any(1)
        if bad.any():
            raise DataError(
                f"{what}: example {int(bad.nonzero()[0])} (counting from 0) holds NaN or infinite values "
                f"({int(bad.sum())} examples do); expected finite raw values, as "
                f"{self.config.data.name} has them"
            )
        return t.to(self.device)

    def predict(self, x: np.ndarray | torch.Tensor, mc_samples: int = 0, batch_size: int = 1024):
        """Class probabilities (N, classes) of raw inputs; with mc_samples=K the K passes with
        dropout on, stacked (K, N, classes)."""
        probs = evaluate.predict(self.module, self.preprocess(self.inputs(x)), batch_size, mc_samples)
        return probs if isinstance(x, torch.Tensor) else probs.cpu().numpy()


def load(path: str | Path, device: str = "cpu") -> Model:
    """The model of a run directory (its checkpoints/best.pt), a checkpoint or an exported
    .safetensors file, in evaluation mode on `device`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = RunDir(path).best
        if not path.is_file():
            raise UserError(f"{path.parent.parent} has no checkpoints/best.pt: is it a dnnrun run directory?")
    dev = runtime.resolve_device(device)
    ckpt = checkpoint.load(path)
    if ckpt.get("inputs") is None:
        raise UserError(
            f"{path} holds no preprocessing (its inputs' scaling and shape): it was written before "
            "checkpoints held it. Evaluate it with mode=evaluate, which reads its data set again, or train "
            "it again to apply it to new inputs"
        )
    trained = checkpoint.run_config(ckpt, path)
    preprocess = Preprocess.from_dict(ckpt["inputs"])
    module = build(trained, preprocess, ckpt["model"])
    checkpoint.load_into(module, ckpt["model"], path)
    return Model(module.to(dev).eval(), trained, preprocess, dev, path)


def build(cfg: RunConfig, preprocess: Preprocess, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained model's architecture, from its config and what its inputs were (no data set)."""
    shape = preprocess.shape
    inputs = model_mod.Inputs(
        features=math.prod(shape),
        classes=len(preprocess.class_names),
        shape=shape if len(shape) == 3 else None,
        resize=cfg.data.resize,
    )
    return runtime.build_for(cfg, inputs, model_mod.fitting_config(cfg.model, state))[0]


# ---------------------------------------------------------------------------------------------
# Reading inputs


def read(path: Path, model: Model) -> tuple[torch.Tensor, list[str]]:
    """The examples in a .npy, .npz or .csv file, or the image files of a folder (sorted by name),
    and what names each in predictions.csv (its row number, or its file name). What a file claims
    (an array's shape and type, an image's size and mode) is checked before its data is read, and
    nothing in it is run: no pickle, no Ghostscript."""
    if path.is_dir():
        return _images(path, model)
    if not path.is_file():
        raise DataError(f"predict.input: no file or folder at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                array = _npy(f, path.stat().st_size, str(path), model)
        elif suffix == ".npz":
            array = _npz(path, model)
        elif suffix == ".csv":
            array = _csv(path, math.prod(model.shape))
        else:
            raise DataError(f"predict.input: {path} is neither .npy, .npz nor .csv (nor a folder of images)")
    except (ValueError, OSError, zipfile.BadZipFile, NotImplementedError) as exc:  # NotImplemented: a zip's method
        raise DataError(f"predict.input: cannot read {path} ({' '.join(str(exc).split())[:200]})") from None
    if array.ndim < 1 or len(array) == 0:
        raise DataError(f"predict.input: {path} holds no examples")
    # float32 is what Model.inputs makes of any numbers; made here, it takes as well a big-endian or
    # uint16 array, which torch.as_tensor refuses
    x = array.astype(np.float32, copy=False)
    return model.inputs(x, f"predict.input {path}"), [str(i) for i in range(len(array))]


def _too_many(where: str | Path, count: int) -> DataError:
    return DataError(
        f"predict.input: {where} holds {count:,} values, more than the {MAX_INPUT_VALUES:,} one input may hold "
        "(MAX_INPUT_VALUES): predict in parts, with dnnrun.load(...).predict in a loop"
    )


def _npy(f: BinaryIO, size: int, where: str, model: Model) -> np.ndarray:
    """The array of a .npy file (or an .npz member) of `size` bytes, its header checked before its
    data is read: numbers only (never a pickle), at most MAX_INPUT_VALUES of them, examples of the
    model's shape, and no more bytes than the file holds."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):  # 3.0: a header in UTF-8, only for records with such field names
        raise DataError(
            f"predict.input: {where} is a .npy file of format version {version[0]}.{version[1]}; dnnrun "
            "reads versions 1.0 and 2.0 (what numpy writes for arrays of numbers)"
        )
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)  # a literal of at most 10 000 characters, parsed, not run
    if dtype.kind not in NUMBERS or dtype.itemsize > 8:
        holds = f"records (fields {', '.join(dtype.names)})" if dtype.names else _NOT_NUMBERS.get(dtype.kind, "")
        raise DataError(
            f"predict.input: {where} holds {holds or 'values'} of dtype {dtype.str}, not numbers: refused unread; "
            "expected an array of integers or floats (of at most 64 bits)"
        )
    if any(n < 0 for n in shape):
        raise DataError(f"predict.input: cannot read {where} (its header claims the shape {shape})")
    if not shape or shape[0] == 0:
        raise DataError(f"predict.input: {where} holds no examples")
    count = math.prod(shape)
    if count > MAX_INPUT_VALUES:
        raise _too_many(where, count)
    # The model's own check of one example's shape, on a stand-in of the claimed shape (zero strides: no memory)
    model.inputs(torch.zeros(()).expand(1, *shape[1:]), f"predict.input {where}")
    follow = size - f.tell()
    if count * dtype.itemsize > follow:
        raise DataError(
            f"predict.input: {where} claims an array of shape {shape} and dtype {dtype.str} "
            f"({count * dtype.itemsize:,} bytes), but {follow:,} bytes follow its header: refused unread"
        )
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False)


def _npz(path: Path, model: Model) -> np.ndarray:
    """The inputs of an .npz archive: its one array, or the one named x (or inputs)."""
    with zipfile.ZipFile(path) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        names = list(members)
        key = names[0] if len(names) == 1 else next((k for k in ("x", "inputs") if k in names), None)
        if key is None:
            raise DataError(
                f"predict.input: {path} holds arrays {', '.join(names)}; name the inputs x (or hold one array only)"
            )
        info = archive.getinfo(members[key])
        if not info.filename.endswith(".npy") or info.flag_bits & 0x1:  # bit 0: encrypted
            raise DataError(f"predict.input: {path} holds {info.filename}, not a .npy array as numpy.savez writes")
        with archive.open(info) as f:
            return _npy(f, info.file_size, f"{path} (array {key})", model)


def _csv(path: Path, features: int) -> np.ndarray:
    """Rows of numbers; a first row that is not numbers is a header. Read a line at a time, each at
    most `longest` characters, to at most MAX_INPUT_VALUES values."""
    longest = 64 * features + 1024  # a float's text takes at most 24 characters: "-1.7976931348623157e+308"

    def lines(f):
        for number, line in enumerate(iter(lambda: f.readline(longest + 1), ""), 1):
            if len(line) > longest:
                raise DataError(
                    f"predict.input: {path}, line {number} is longer than {longest:,} characters; a row of "
                    f"the model's {features} values takes far fewer"
                )
            yield line

    values: list[np.ndarray] = []
    header, count = False, 0
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first value
        reader = csv.reader(lines(f))
        try:
            for row in reader:
                if not row:
                    continue
                try:
                    values.append(np.array([float(v) for v in row]))
                except ValueError:
                    if values or header:
                        raise DataError(
                            f"predict.input: {path}, data row {len(values) + 1} holds a value that is not a number"
                        ) from None
                    header = True
                    continue
                if len(values[-1]) != len(values[0]):
                    raise DataError(
                        f"predict.input: {path}, data row {len(values)} has {len(values[-1])} values, "
                        f"the first {len(values[0])}"
                    )
                count += len(values[-1])
                if count > MAX_INPUT_VALUES:
                    raise _too_many(path, count)
        except csv.Error as exc:
            raise DataError(f"predict.input: cannot read {path}, line {reader.line_num} ({exc})") from None
    return np.array(values, dtype=np.float64)


def _images(folder: Path, model: Model) -> tuple[torch.Tensor, list[str]]:
    from PIL import UnidentifiedImageError

    shape = model.shape
    if len(shape) != 3:
        raise DataError(
            f"predict.input: {folder} is a folder of images, but the model takes vectors of "
            f"{shape[0]} values (give a .npy, .npz or .csv file)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_FILES and p.is_file())
    if not files:
        raise DataError(f"predict.input: {folder} holds no image files ({', '.join(IMAGE_FILES)})")
    if len(files) * math.prod(shape) > MAX_INPUT_VALUES:
        raise _too_many(folder, len(files) * math.prod(shape))
    grey = shape[0] == 1
    resizes = model.config.data.resize is not None or model_mod.MODELS[model.config.model.name].own_inputs
    images, converted = [], []
    for file in files:
        try:
            array, changed = _image(file, grey, (shape[2], shape[1]), resizes)
        except UnidentifiedImageError:
            raise DataError(
                f"predict.input: {file} is not an image dnnrun reads ({', '.join(IMAGE_FORMATS)})"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's plugins raise each
            raise DataError(f"predict.input: cannot read {file} as an image ({exc})") from None
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        if changed:
            converted.append(file.name)
    if converted:
        log.warning(
            "predict.input: %d of the %d images in %s are %s (%s first): read as %s, as the model was trained on %s "
            "images",
            len(converted),
            len(files),
            folder,
            *(
                ("colour", converted[0], "grey (L = 0.299 R + 0.587 G + 0.114 B)", "grey")
                if grey
                else ("grey", converted[0], "RGB (the grey value in each of R, G and B)", "RGB")
            ),
        )
    return model.inputs(np.stack(images), f"predict.input {folder}"), [f.name for f in files]


def _image(file: Path, grey: bool, size: tuple[int, int], resizes: bool) -> tuple[np.ndarray, bool]:
    """One image file as uint8 pixels, (H, W) grey or (H, W, 3) RGB, of `size` (width, height),
    and whether its colours were converted to be so. What its header claims (its size, its mode,
    its frames) is checked before its pixels are decoded."""
    from PIL import Image

    with open(file, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's limit refuses, not warns
        try:
            image = Image.open(f, formats=IMAGE_FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise DataError(
                f"predict.input: {file} claims more pixels in its header than Pillow's decompression-bomb "
                f"limit of {Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS): refused unread"
            ) from None
        if image.size != size and not resizes:
            raise DataError(
                f"predict.input: {file} is {image.size[0]} x {image.size[1]} pixels; the model takes "
                f"{size[0]} x {size[1]} (it has no resize layer: train with data.resize to take other sizes)"
            )
        if getattr(image, "is_animated", False):
            raise DataError(f"predict.input: {file} holds several frames; the model takes one image per file")
        if image.mode not in GREY_MODES + COLOUR_MODES:
            raise DataError(
                f"predict.input: {file} has pixels of mode {image.mode} (Pillow's name); dnnrun reads 8-bit grey "
                f"and colour images only (modes {', '.join(GREY_MODES + COLOUR_MODES)})"
            )
        was_grey = image.mode in GREY_MODES
        if "A" in image.getbands() or "transparency" in image.info:
            image = image.convert("RGBA")
            if image.getchannel("A").getextrema()[0] < 255:
                raise DataError(
                    f"predict.input: {file} has transparent pixels; the model takes opaque "
                    f"{'grey' if grey else 'RGB'} images (flatten it onto a background first)"
                )
        image = image.convert("L" if grey else "RGB")
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8), was_grey != grey


# ---------------------------------------------------------------------------------------------
# mode=predict


def run(cfg: RunConfig, run_dir: str | Path, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Predict the classes of predict.input with predict.checkpoint; everything that can refuse it
    (the checkpoint, the inputs) is checked before the directory is written."""
    pc, run_dir = cfg.predict, RunDir(run_dir)
    model = load(pc.checkpoint, cfg.trainer.device)
    runtime.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)  # MC dropout's masks
    x, names = read(Path(pc.input).expanduser(), model)
    probs = evaluate.predict(model.module, model.preprocess(x), cfg.trainer.eval_batch_size, pc.mc_samples)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    mean = probs.mean(0) if pc.mc_samples else probs
    confidence, predicted = mean.max(1)
    columns = {
        "input": names,
        "predicted": [model.classes[i] for i in predicted.tolist()],
        "probability": confidence.tolist(),
    }
    if pc.mc_samples:
        columns["std"] = probs.gather(2, predicted[None, :, None].expand(len(probs), -1, 1)).squeeze(2).std(0).tolist()
        columns["entropy"] = (-(mean * mean.clamp_min(1e-12).log()).sum(1)).tolist()
    for c, name in enumerate(model.classes):
        columns[f"p_{name}"] = mean[:, c].tolist()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))
    out = run_dir.path / "predictions.csv"
    atomic_write(out, lambda f: f.write(text.getvalue().encode()))
    result = {
        "status": "completed",
        "mode": "predict",
        "checkpoint": str(model.source),
        "input": str(pc.input),
        "examples": len(names),
        "mc_samples": pc.mc_samples,
        "predictions": str(out),
    }
    run_dir.write_summary(result)
    log.info("predicted %d examples of %s with %s: %s", len(names), pc.input, model.source, out)
    return result
