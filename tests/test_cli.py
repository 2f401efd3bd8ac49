"""The `dnnrun` command: the installed console script in a process of its own as a user runs it
(the happy path, `python -m dnnrun`, a typo), and its main() in this process for the rest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from dnnrun.cli.conf import digest
from dnnrun.store.rundir import read_jsonl

EPOCH_KEYS = {"epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "time/epoch_s"}


def test_dnnrun_trains_and_leaves_a_complete_run_directory(tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli(
        "data=synthetic",
        "trainer.epochs=2",
        "optimizer=adam",
        "act=elu",
        "trainer.diagnostics.plots=true",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        process=True,
    )
    assert result.returncode == 0, result.stderr
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "metrics.jsonl",
        "summary.json",
        "run.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "diagnostics.jsonl",
        "activations.json",
        "status.json",
        "plots/learning_curves.png",
    ):
        assert (run / name).is_file(), name
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(set(r) == EPOCH_KEYS for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test"]["test/acc"] > 0.5  # four separable classes: chance is 0.25
    assert "epoch 2/2" in (run / "run.log").read_text()
    assert "test/acc" in result.stdout  # the results table
    snapshot = (run / ".hydra/config.yaml").read_text()
    assert "name: elu" in snapshot and "name: adam" in snapshot
    # Where things go and what was chosen, said before the first epoch (the console may wrap lines).
    said = " ".join(result.stdout.split())
    start = said.index("epoch 1/2")
    assert -1 < said.find(f"run directory: {run} (on cpu)") < start
    assert (
        -1
        < said.find(
            "data=synthetic model=mlp init=he_normal act=elu norm=none optimizer=adam "
            "schedule=constant regularizer=[none] trainer=default logger=none pretrain=none"
        )
        < start
    )


def test_cfg_job_shows_the_chosen_option_of_each_group(tmp_path: Path):
    """Two presets of one registry entry (variance_scaling) are told apart by their `option`."""
    result = run_cli("--cfg", "job", "init=glorot_uniform", "act=leaky_relu_0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "option: glorot_uniform\n  name: variance_scaling" in result.stdout
    assert "option: leaky_relu_0.2\n  name: leaky_relu" in result.stdout


def test_plain_dnnrun_trains_digits_with_no_network(tmp_path: Path):
    result = run_cli(cwd=tmp_path, root_at_cwd=False)  # exactly `dnnrun`
    assert result.returncode == 0, result.stderr
    (summary_path,) = (tmp_path / "outputs").glob("*/*/summary.json")  # outputs/<date>/<time>/
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 20
    assert summary["data"] == {"train": 1294, "val": 144, "test": 359, "features": 64, "classes": 10}
    assert summary["test"]["test/acc"] > 0.9


def test_python_dash_m_dnnrun_works(tmp_path: Path):
    result = run_cli(
        "data=synthetic",
        "trainer.epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        process=True,
        module=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_multirun_writes_one_directory_per_job(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "act=relu,elu", "data=synthetic", "trainer.epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    # a short name (number and a digest of the overrides); the overrides in the job's own files
    assert [j.name for j in jobs] == [
        f"0_{digest('act=relu,data=synthetic,trainer.epochs=1')}",
        f"1_{digest('act=elu,data=synthetic,trainer.epochs=1')}",
    ]
    assert all(len(j.name) == 10 for j in jobs)
    assert [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text())[0] for j in jobs] == ["act=relu", "act=elu"]


def test_help_lists_every_group_and_option_with_a_description(tmp_path: Path):
    from dnnrun.cli import CONFIG_DIR, GROUP_HELP, option_line
    from dnnrun.cli.help import group_options

    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for group in (p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        assert GROUP_HELP.get(group.name), f"no description for group {group.name}"
        assert f"{group.name}: {GROUP_HELP[group.name]}" in result.stdout
        options = group_options(group.name)  # experiment=chapter/prelu: the files in its folders too
        assert {path for _, path in options} == set(group.rglob("*.yaml"))
        for name, path in options:
            assert option_line(path), f"{path} has no description comment"
            assert re.search(rf"^  {re.escape(name)} +{re.escape(option_line(path))}$", result.stdout, re.M)


BAD_INPUTS = {
    "type": (["trainer.epochs=abc"], ["trainer.epochs", "expected an integer", "'abc'"]),
    "negative lr": (["optimizer.lr=-1"], ["optimizer.lr", "must be > 0", "-1"]),
    "nan lr": (["optimizer.lr=nan"], ["optimizer.lr", "finite"]),
    "misspelled key": (["trainer.epochz=3"], ["trainer.epochz", "valid:", "epochs", "did you mean 'epochs'"]),
    "added unknown parameter": (["+optimizer.momentun=0.9"], ["optimizer.momentun", "did you mean 'momentum'"]),
    "unknown option": (
        ["optimizer=adamm"],
        ["adamm", "valid: adagrad, adam, adamax, adamw, momentum, nadam, nesterov", "did you mean 'adam'"],
    ),
    "unknown option in a sweep": (["-m", "act=relu,elu,eluu"], ["act=eluu", "valid: elu, gelu", "did you mean 'elu'"]),
    "several at once": (
        ["optimizer.lr=abc", "trainer.epochs=0", "data.val_size=2.5"],
        ["3 problems", "optimizer.lr", "trainer.epochs", "data.val_size"],
    ),
    "missing resume file": (["trainer.resume=/nonexistent/last.pt"], ["trainer.resume", "/nonexistent/last.pt"]),
    "missing dataset files": (
        ["data=fashion_mnist", "data.root=ROOT", "data.download=false"],
        [
            "put the unpacked train-images-idx3-ubyte, ",
            "t10k-labels-idx1-ubyte in ROOT/FashionMNIST/raw.",
            "only with data.download=true",
        ],
    ),
    "override syntax": (["trainer.epochs=["], ["trainer.epochs=["]),
    "a config printed for a sweep": (["--cfg", "job", "-m", "act=relu,elu"], ["--cfg prints one", "drop -m"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path: Path, case):
    args, expected = BAD_INPUTS[case]
    root = tmp_path / "empty"
    args = [a.replace("ROOT", str(root)) for a in args]
    expected = [e.replace("ROOT", str(root)) for e in expected]
    run = tmp_path / "run"
    result = run_cli(
        *args,
        f"hydra.run.dir={run}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        process=case == "unknown option",
    )  # a typo, as a user meets it
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in output, (text, output)
    assert not (run / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2(tmp_path: Path):
    result = run_cli("data=synthetic", "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("installed, refused", [("2.9.1", True), ("2.10.0+cu128", False), ("2.14.1+cpu", False)])
def test_a_torch_older_than_2_10_is_refused(installed, refused, monkeypatch, capsys):
    import importlib.metadata

    from dnnrun import cli

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    if refused:
        with pytest.raises(SystemExit) as stop:
            cli.check_torch()
        assert stop.value.code == 2
        assert (
            f"needs PyTorch 2.10 or later (its safe checkpoint loader); this is {installed}" in capsys.readouterr().err
        )
    else:
        cli.check_torch()


@pytest.mark.parametrize(
    "refused",
    ["trainer.resume=/no/such.pt", "transfer.source=/no/such.pt", "data.val_size=100000", "trainer.device=cuda"],
)
def test_a_run_refused_once_it_starts_leaves_no_outputs_root_it_made(tmp_path: Path, refused):
    if refused == "trainer.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("data=synthetic", refused, f"outputs={tmp_path / 'new'}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not (tmp_path / "new").exists()
    made = tmp_path / "kept"
    made.mkdir()  # a root that was there before stays
    assert run_cli("data=synthetic", refused, f"outputs={made}", cwd=tmp_path).returncode == 2
    assert made.is_dir() and not any(made.iterdir())


def test_a_run_directory_that_cannot_take_status_json_ends_with_a_message_not_a_traceback(tmp_path: Path, monkeypatch):
    from dnnrun.store.rundir import RunDir

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.status))

    monkeypatch.setattr(RunDir, "write_status", read_only)
    result = run_cli("data=synthetic", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"cannot record how the run ended in {tmp_path / 'run' / 'status.json'}: Permission denied" in result.stderr


def test_a_reader_that_stops_early_does_not_stop_the_run(tmp_path: Path):
    """`dnnrun | head -2`: once head has its lines the pipe is closed; the run goes on quietly and
    ends as it would have, recorded (status.json, run.log), with its own exit code."""
    import subprocess

    from conftest import DNNRUN

    run = tmp_path / "run"
    command = [str(DNNRUN), "trainer.epochs=3", "data=synthetic", f"hydra.run.dir={run}", f"outputs={tmp_path}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()  # the first line, then the reader goes away
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert "epoch 3/3" in (run / "run.log").read_text() and b"Traceback" not in err
