"""The wheel ships conf/, and an installed wheel finds its configs without the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy, so the checkout gets no build/ folder and stale build files cannot leak in.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("dnnrun", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("dnnrun-*.whl")
    return path


def test_the_wheel_contains_every_config(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"dnnrun/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "dnnrun/conf/config.yaml" in configs and len(configs) >= 10
    assert configs <= names
    assert "dnnrun/cli/__init__.py" in names
    assert "hydra_plugins/dnnrun_optuna/optuna_sweeper.py" in names  # where Hydra finds dnnrun's sweeper
    assert "hydra_plugins/__init__.py" not in names  # a namespace that other plugins share


def test_an_installed_wheel_composes_its_config_away_from_the_source_tree(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import dnnrun.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [str(site / "dnnrun" / "cli" / "__init__.py"), str(site / "dnnrun" / "conf")]
    shown = subprocess.run(
        [sys.executable, "-m", "dnnrun", "--cfg", "job", "data=synthetic", "optimizer=adam"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert "name: synthetic" in shown.stdout and "name: adam" in shown.stdout
