"""dnnrun-export CHECKPOINT [--out FILE]: a checkpoint's model weights and config as safetensors.

The file holds tensors and strings only, so loading it cannot run code. `transfer.source` and
`evaluate.checkpoint` accept it in place of a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dnnrun.checkpoint import export_safetensors
from dnnrun.errors import command


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnrun-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, help="default: the checkpoint's name with .safetensors")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_suffix(".safetensors")
    print(export_safetensors(args.checkpoint, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
