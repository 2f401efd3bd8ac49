"""Services that some tests run against: a Slurm cluster and a PostgreSQL server on this machine,
each started once per test session by its script in services/ (which returns at once when it is
up already; .ci/run starts both before the suite). Where one cannot be had the test is skipped
with the reason, and fails instead in CI (CI=true), where a skipped test would hide that the
service is missing."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[1] / "services"
PARTITION = os.environ.get("SLURM_PARTITION", "debug")  # the partition services/slurm.sh makes
POSTGRES_PORT = os.environ.get("DNNRUN_POSTGRES_PORT", "5433")
POSTGRES_PASSWORD = "testonly-7c41e9"  # services/postgres.sh's; tests put it in PGPASSWORD for their processes


def slurm() -> str:
    """The partition of the running single-node Slurm cluster."""
    _require("slurm.sh")
    return PARTITION


def postgres() -> str:
    """The URL (without its password) of the database dnnrun on the running PostgreSQL server."""
    _require("postgres.sh", POSTGRES_PORT)
    return f"postgresql://dnnrun@127.0.0.1:{POSTGRES_PORT}/dnnrun"


def _require(script: str, *args: str) -> None:
    problem = _start(script, *args)
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


@functools.cache
def _start(script: str, *args: str) -> str | None:
    """None once the script has the service up, else why it has not (the script's own words)."""
    command = ["bash", str(SERVICES / script), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"services/{script}: {exc}"
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-3000:]
        return f"services/{script} exited with {done.returncode}: {said}"
    return None
