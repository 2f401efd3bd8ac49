"""dnnrun rerun=RUN_DIR: a finished run again from its saved overrides, read as YAML, into a new
directory; on the CPU its metrics equal the first run's, times aside."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import run_cli
from dnnrun.store.rundir import read_jsonl


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl, the times (time/epoch_s, time/eval_train_s) aside."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run / "metrics.jsonl")]


def test_a_rerun_repeats_the_run_exactly_in_a_new_directory(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_cli("act=elu", "regularizer=[dropout]", "trainer.epochs=3", f"hydra.run.dir={first}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli(f"rerun={first}", f"hydra.run.dir={second}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _metrics(second) == _metrics(first) and len(_metrics(first)) == 3
    assert (
        json.loads((second / "summary.json").read_text())["test"]
        == json.loads((first / "summary.json").read_text())["test"]
    )
    overrides = yaml.safe_load((second / ".hydra" / "overrides.yaml").read_text())
    assert "act=elu" in overrides and "regularizer=[dropout]" in overrides  # the first run's, recorded again
    result = run_cli(f"rerun={first}", "trainer.epochs=4", f"hydra.run.dir={tmp_path / 'longer'}", cwd=tmp_path)
    assert result.returncode == 0 and _metrics(tmp_path / "longer")[:3] == _metrics(first)  # a given override wins


def test_a_run_whose_config_no_longer_composes_the_same_is_refused_with_the_differences(tmp_path: Path):
    run = tmp_path / "run"
    assert run_cli("trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    saved = run / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.01", "lr: 0.05"))  # as if the default had been 0.05 then
    result = run_cli(f"rerun={run}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "  - optimizer.lr: 0.05 in the run, 0.01 now\n" in result.stderr
    assert "cannot run again exactly" in result.stderr and not (tmp_path / "again").exists()
    result = run_cli(f"rerun={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 2 and f"rerun={tmp_path / 'nowhere'}: no such directory" in result.stderr


def test_a_rerun_takes_nothing_of_where_the_first_run_wrote(tmp_path: Path):
    """A run directory copied from elsewhere may name any place in its overrides: the re-run leaves
    them out and writes where its own command line says."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    run = root / "run"
    assert run_cli("trainer.epochs=1", f"hydra.run.dir={run}", cwd=root).returncode == 0
    saved = run / ".hydra" / "overrides.yaml"
    crafted = [f"outputs={elsewhere}", f"hydra.run.dir={elsewhere / 'run'}", "hydra.output_subdir=../../y",
               f"data.root={elsewhere / 'data'}", "+hydra.job.env_set.LD_PRELOAD=x.so"]  # fmt: skip
    saved.write_text(yaml.safe_dump([*yaml.safe_load(saved.read_text()), *crafted]))
    result = run_cli(f"rerun={run}", f"hydra.run.dir={root / 'again'}", cwd=root)
    assert result.returncode == 0, result.stderr
    assert not elsewhere.exists() and not (tmp_path / "y").exists()
    assert _metrics(root / "again") == _metrics(run)
