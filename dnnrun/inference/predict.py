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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnnrun.config.run_config import RunConfig, parse_run_config
from dnnrun.data.datasets import Preprocess
from dnnrun.errors import ConfigError, DataError, UserError
from dnnrun.inference import evaluate
from dnnrun.models import registry as model_mod
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, atomic_write
from dnnrun.training import runtime

log = logging.getLogger("dnnrun")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    try:
        trained = parse_run_config(ckpt["config"])
    except ConfigError as exc:
        raise UserError(
            f"{path} is not a usable dnnrun checkpoint: the config saved in it is invalid:\n"
            + "\n".join(f"  - {p}" for p in exc.problems)
        ) from None
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
    and what names each in predictions.csv (its row number, or its file name)."""
    if path.is_dir():
        return _images(path, model)
    if not path.is_file():
        raise DataError(f"predict.input: no file or folder at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                names = list(arrays.keys())
                key = names[0] if len(names) == 1 else next((k for k in ("x", "inputs") if k in names), None)
                if key is None:
                    raise DataError(
                        f"predict.input: {path} holds arrays {', '.join(names)}; name the inputs x "
                        "(or hold one array only)"
                    )
                array = arrays[key]
        elif suffix == ".csv":
            array = _csv(path)
        else:
            raise DataError(f"predict.input: {path} is neither .npy, .npz nor .csv (nor a folder of images)")
    except (ValueError, OSError) as exc:
        raise DataError(f"predict.input: cannot read {path} ({' '.join(str(exc).split())[:200]})") from None
    if array.ndim < 1 or len(array) == 0:
        raise DataError(f"predict.input: {path} holds no examples")
    return model.inputs(array, f"predict.input {path}"), [str(i) for i in range(len(array))]


def _csv(path: Path) -> np.ndarray:
    """Rows of numbers; a first row that is not numbers is a header."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows = [r for r in rows if r]
    try:
        [float(v) for v in rows[0]]
    except (ValueError, IndexError):
        rows = rows[1:]
    values = []
    for i, row in enumerate(rows):
        try:
            values.append([float(v) for v in row])
        except ValueError:
            raise DataError(f"predict.input: {path}, data row {i + 1} holds a value that is not a number") from None
        if len(values[-1]) != len(values[0]):
            raise DataError(
                f"predict.input: {path}, data row {i + 1} has {len(values[-1])} values, the first {len(values[0])}"
            )
    return np.asarray(values, dtype=np.float64)


def _images(folder: Path, model: Model) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    shape = model.shape
    if len(shape) != 3:
        raise DataError(
            f"predict.input: {folder} is a folder of images, but the model takes vectors of "
            f"{shape[0]} values (give a .npy, .npz or .csv file)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_FILES)
    if not files:
        raise DataError(f"predict.input: {folder} holds no image files ({', '.join(IMAGE_FILES)})")
    channels, height, width = shape
    resizes = model.config.data.resize is not None or model_mod.MODELS[model.config.model.name].own_inputs
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                if image.size != (width, height):
                    if not resizes:
                        raise DataError(
                            f"predict.input: {file} is {image.size[0]} x {image.size[1]} pixels; the model "
                            f"takes {width} x {height} (it has no resize layer: train with data.resize to "
                            "take other sizes)"
                        )
                    image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"predict.input: cannot read {file} as an image ({exc})") from None
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return model.inputs(np.stack(images), f"predict.input {folder}"), [f.name for f in files]


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
