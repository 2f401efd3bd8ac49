"""Shared helpers: configs composed from the real conf/ tree, and the installed CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dnnrun.cli import CONFIG_DIR
from dnnrun.config import RunConfig, parse_run_config

DNNRUN = Path(sys.executable).parent / "dnnrun"  # the console script of the environment under test


def compose_raw(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def make_config(*overrides: str) -> RunConfig:
    """A run on the small synthetic set, quiet, for a few epochs and without plots unless overridden
    (drawing them takes longer than such a run; tests/test_diagnostics.py checks them)."""
    return parse_run_config(
        compose_raw("data=synthetic", "trainer.epochs=3", "trainer.progress=false", "trainer.diagnostics.plots=false",
                    *overrides)
    )


def run_cli(*args: str, cwd: Path, module: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dnnrun"] if module else [str(DNNRUN)]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
