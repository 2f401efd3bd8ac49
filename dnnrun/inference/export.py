"""dnnrun-export CHECKPOINT [--format safetensors|onnx] [--out FILE]: a trained model to apply elsewhere.

CHECKPOINT is a checkpoint file, or a run directory (its checkpoints/best.pt).

- safetensors (the default): the model's weights, its config and the inputs' preprocessing
  (scaling statistics, shape, class names), with the checksum of its tensors. The file holds
  tensors and strings only, so loading it cannot run code; `dnnrun.load`, `mode=predict`,
  `transfer.source` and `evaluate.checkpoint` accept it in place of a checkpoint. The weights are
  checked first to be exactly those of the model the config describes (its keys and shapes, the
  model built on torch's meta device, as a reader of the file builds it).
- onnx (`pip install 'dnnrun[onnx]'`): one graph from raw inputs to class probabilities, the
  preprocessing (scaling, a zoo network's resizing and normalization) and the softmax included.
  Input `inputs`, float32 (batch, *shape) as the data set has the values (pixels 0..255); output
  `probabilities` (batch, classes). The class names and the run's config are in the model's
  metadata (`class_names`, `dnnrun_config`, JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from dnnrun.errors import UserError, command
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir, atomic_write

log = logging.getLogger("dnnrun")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnrun-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint, or a run directory (its best.pt)")
    parser.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    parser.add_argument("--out", type=Path, help="default: the checkpoint's name with .safetensors or .onnx")
    args = parser.parse_args(argv)
    source = RunDir(args.checkpoint).best if args.checkpoint.is_dir() else args.checkpoint
    out = args.out or source.with_suffix(f".{args.format}")
    print(export_onnx(source, out) if args.format == "onnx" else export_safetensors(source, out))
    return 0


def export_safetensors(source: Path, out: Path) -> Path:
    """The weights, config and preprocessing of `source` as safetensors, once the weights are checked
    to fit the model that the config describes."""
    state = checkpoint.load(source)
    check_model(state, source)
    return checkpoint.write_safetensors(state, out)


def check_model(state: dict[str, Any], path: Path) -> None:
    """Refuse (UserError) weights that are not exactly those of the model that the checkpoint's
    config and preprocessing describe, built on the meta device as dnnrun.load builds it: the same
    keys, the same shapes. A checkpoint without its preprocessing (written before checkpoints held
    it) says too little to build the model: its export is written unchecked, with a warning."""
    import torch

    from dnnrun.data.datasets import Preprocess
    from dnnrun.inference.predict import build

    trained = checkpoint.run_config(state, path)
    if state.get("inputs") is None:
        log.warning("%s holds no preprocessing: its weights cannot be checked against its config", path)
        return
    with torch.device("meta"):
        model = build(trained, Preprocess.from_dict(state["inputs"]), state["model"])
    checkpoint.check_fits(model, state["model"], path)


def export_onnx(source: Path, out: Path) -> Path:
    """The model of `source` with its preprocessing and a softmax, as one ONNX graph (written
    atomically), its batch size free."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]  # the exporter's
    if missing:
        raise UserError(f"--format onnx needs {' and '.join(missing)}: pip install 'dnnrun[onnx]'")
    import torch

    from dnnrun.inference.predict import load

    model = load(source)

    class Applied(torch.nn.Module):
        """Raw inputs to class probabilities: what Model.predict computes."""

        def __init__(self):
            super().__init__()
            self.module = model.module

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.module(model.preprocess(inputs)).softmax(1)

    example = torch.zeros((2, *model.shape))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
        try:
            program = torch.onnx.export(
                Applied().eval(),
                (example,),
                input_names=["inputs"],
                output_names=["probabilities"],
                dynamo=True,
                dynamic_shapes={"inputs": {0: torch.export.Dim("batch")}},
            )
        except Exception as exc:  # torch.onnx's errors have no public base class
            raise UserError(f"cannot export {source} to ONNX: {' '.join(str(exc).split())[:300]}") from None
    proto = program.model_proto
    for key, value in (("class_names", json.dumps(model.classes)), ("dnnrun_config", json.dumps(model.config.raw))):
        proto.metadata_props.add(key=key, value=value)
    atomic_write(Path(out), lambda f: f.write(proto.SerializeToString()))
    return Path(out)


if __name__ == "__main__":
    sys.exit(main())
