"""dnnrun-export CHECKPOINT [--format safetensors|onnx] [--out FILE]: a trained model to apply elsewhere.

CHECKPOINT is a checkpoint file, or a run directory (its checkpoints/best.pt).

- safetensors (the default): the model's weights, its config and the inputs' preprocessing
  (scaling statistics, shape, class names). The file holds tensors and strings only, so loading it
  cannot run code; `dnnrun.load`, `mode=predict`, `transfer.source` and `evaluate.checkpoint`
  accept it in place of a checkpoint.
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
import sys
from pathlib import Path

from dnnrun.errors import UserError, command
from dnnrun.store.checkpoint import export_safetensors
from dnnrun.store.rundir import RunDir, atomic_write


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
