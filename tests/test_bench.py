"""bench/gpu.py, the prepared GPU check, runs its every check on the CPU as a dry run (toy sizes;
its figures mean nothing there), so that the one call a lent GPU gets does not fail on a typo."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
CHECKS = ["amp+channels-last cnn", "amp+channels-last resnet", "compile mlp", "members K=2", "images cnn",
          "images resnet", "throughput b32", "throughput b256", "memory mlp", "memory cnn", "memory resnet",
          "per-step read b32"]  # fmt: skip


def test_the_gpu_check_runs_every_check_as_a_dry_run_on_the_cpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/gpu.py` finds the other benches
    monkeypatch.setattr("dnnrun.cli.process.keep_freed_memory", lambda: None)  # this process is the tests'
    import gpu

    level = logging.getLogger("dnnrun").level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert gpu.main(["--dry-run"]) == 0
    finally:
        logging.getLogger("dnnrun").setLevel(level)
        for name in ("gpu", "images", "members", "throughput"):
            sys.modules.pop(name, None)
    table = out.getvalue().splitlines()
    assert "dry run: the figures mean nothing" in table[0]
    assert [line.split("  ")[0] for line in table[2:]] == CHECKS
