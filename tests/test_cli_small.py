"""Small things at the command line: --version, --help (the settings outside the groups, a closed
pipe), suggestions that ignore case, a sweep preset without -m, and a signal while dnnrun starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DNNRUN, run_cli
from dnnrun.cli import CONFIG_DIR
from dnnrun.config.schema import did_you_mean


def test_version_names_dnnrun_torch_and_hydra(tmp_path: Path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name, distribution in (("dnnrun", "dnnrun"), ("torch", "torch"), ("Hydra", "hydra-core")):
        assert f"{name} {version(distribution)}" in result.stdout, result.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(flag: str):
    code = (
        "import sys; sys.argv = ['dnnrun', '" + flag + "']\n"
        "from dnnrun.cli import main\n"
        "main()\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "no torch"


def test_help_lists_mode_and_the_settings_of_each_mode(tmp_path: Path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    config = OmegaConf.load(CONFIG_DIR / "config.yaml")
    keys = ["mode"] + [f"{section}.{key}" for section in ("transfer", "lr_find", "evaluate") for key in config[section]]
    for key in keys:
        assert sum(line.startswith(f"  {key}=") for line in lines) == 1, key
    # each with its default and the comment of its line in config.yaml
    for text in (
        "  mode=train ",
        "train | lr_find (learning-rate range test) | evaluate",
        "  transfer.source=null ",
        "a dnnrun checkpoint, e.g. outputs/task_a/checkpoints/best.pt",
        "  lr_find.steps=300",
        "  evaluate.mc_samples=0 ",
        "> 0: MC dropout, averaging",
        "transfer: start from another run's hidden layers",
    ):
        assert text in result.stdout, text


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_output_into_a_closed_pipe_ends_quietly_with_141(flag: str):
    """As `dnnrun --help | head -1` when head has gone: the read end is closed before dnnrun writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [str(DNNRUN), flag], check=False, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as the shell reports git cut short


@pytest.mark.parametrize(
    "name, choices, suggested",
    [
        ("Relu", ["elu", "relu", "selu"], "relu"),  # difflib alone finds 'elu' closer
        ("ADAMM", ["adam", "adamax", "adamw"], "adam"),
        ("val/ACC", ["val/acc", "val/loss"], "val/acc"),
        ("MOMENTUN", ["momentum", "nesterov"], "momentum"),
    ],
)
def test_the_suggestion_ignores_case(name, choices, suggested):
    assert did_you_mean(name, choices) == f" (did you mean '{suggested}'?)"
    assert did_you_mean("xyz", choices) == ""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["act=Relu"], "did you mean 'relu'"),
        (["trainer.EPOCHS=3"], "did you mean 'epochs'"),
    ],
)
def test_a_name_in_the_wrong_case_is_refused_with_the_right_one_suggested(tmp_path: Path, args, expected):
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["experiment=search"], ["hydra/sweeper=optuna"]])
def test_a_sweep_without_dash_m_is_refused_with_one_message(tmp_path: Path, args):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the config sets up a sweep (hydra/sweeper=optuna")
    assert f"which runs only with -m (--multirun): dnnrun -m {args[0]} " in line
    assert not list(tmp_path.iterdir())  # nothing created


def test_the_search_preset_with_dash_m_passes_the_check():
    from dnnrun.cli import check_command_line

    assert check_command_line(["-m", "experiment=search"]) == []
    assert check_command_line(["experiment=search", "hydra.mode=MULTIRUN"]) == []
    assert "sweep" in " ".join(check_command_line(["experiment=search"]))


# A Hydra search-path plugin, found on PYTHONPATH, that holds dnnrun at the N-th time a config
# search path is built (1: dnnrun's own check composing the config; 2: Hydra composing it for the
# run), after creating the file HOLD_READY: the signal lands there, whatever the machine's speed.
HOLD = """
import os
import time

from hydra.plugins.search_path_plugin import SearchPathPlugin


class HoldStartUp(SearchPathPlugin):
    calls = 0

    def manipulate_search_path(self, search_path):
        HoldStartUp.calls += 1
        if HoldStartUp.calls == int(os.environ["HOLD_AT"]):
            open(os.environ["HOLD_READY"], "w").close()
            time.sleep(120)
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("hold_at", [1, 2], ids=["checking", "hydra-composing"])
def test_a_signal_during_start_up_exits_with_its_code_and_one_line(tmp_path: Path, signum, code, hold_at):
    plugin = tmp_path / "plugins" / "hydra_plugins" / "dnnrun_test_hold"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(HOLD)
    ready = tmp_path / "ready"
    path = os.pathsep.join(p for p in (str(tmp_path / "plugins"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HOLD_AT": str(hold_at), "HOLD_READY": str(ready), "HYDRA_FULL_ERROR": "0"}
    outputs = tmp_path / "outputs"
    # A shell that starts this test in the background (CI scripts) has SIGINT ignored, which dnnrun
    # keeps ignored, as it should: the process under test gets the default handling back.
    process = subprocess.Popen(
        [str(DNNRUN), "data=synthetic", "trainer.epochs=1", f"outputs={outputs}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), process.communicate(timeout=60)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert err.strip().splitlines() == [f"error: stopped by {signal.Signals(signum).name}"]
    assert not outputs.exists()
