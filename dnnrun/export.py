"""dnnrun-export CHECKPOINT [--out FILE]: a checkpoint's model weights and config as safetensors.

CHECKPOINT is a checkpoint file, or a run directory (its checkpoints/best.pt). The file holds
tensors and strings only, so loading it cannot run code. `transfer.source` and
`evaluate.checkpoint` accept it in place of a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dnnrun.checkpoint import export_safetensors
from dnnrun.errors import command
from dnnrun.rundir import RunDir


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnrun-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint, or a run directory (its best.pt)")
    parser.add_argument("--out", type=Path, help="default: the checkpoint's name with .safetensors")
    args = parser.parse_args(argv)
    source = RunDir(args.checkpoint).best if args.checkpoint.is_dir() else args.checkpoint
    out = args.out or source.with_suffix(".safetensors")
    print(export_safetensors(source, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
