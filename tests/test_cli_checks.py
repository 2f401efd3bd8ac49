"""What the installed `dnnrun` checks before Hydra runs: no config may make it call code, no run or
sweep directory outside the outputs root, every problem of a sweep at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from dnnrun import cli

VICTIM = "do not truncate me"
EVIL_CALLBACK = """\
# @package _global_
hydra:
  callbacks:
    evil:
      _target_: builtins.open
      _args_: [VICTIM, w]
"""
EVIL_LOGGING = """\
version: 1
formatters:
  f:
    (): builtins.print
handlers:
  h:
    class: os.system
    stream: ext://antigravity
root:
  handlers: [h]
"""
EVIL_MAIN = """\
defaults:
  - config
  - _self_
hydra:
  launcher:
    _target_: builtins.exec
"""
ALONE = """\
hydra:
  callbacks:
    x:
      _target_: hydra_plugins.hydra_joblib_launcher.joblib_launcher.os.system
      _args_: [touch VICTIM]
"""
HARMLESS = """\
# @package _global_
# a preset kept outside dnnrun's conf/
trainer:
  epochs: 7
"""
NOT_ALLOWED = "may not be instantiated; a config may name only dnnrun.cli.SweepReport, an installed Hydra launcher"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in root.rglob("*")}


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    """A victim file, and config directories whose YAML would open it for writing or run code."""
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM)
    conf = tmp_path / "conf"
    for name, text in {
        "experiment/evil.yaml": EVIL_CALLBACK,
        "experiment/mine.yaml": HARMLESS,
        "hydra/job_logging/evil.yaml": EVIL_LOGGING,
        "evilmain.yaml": EVIL_MAIN,
        "alone/alone.yaml": ALONE,
    }.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text.replace("VICTIM", str(victim)))
    return tmp_path


CODE_IN_CONFIG = {
    "callback on the command line": (
        ["+hydra.callbacks.evil._target_=builtins.open", "+hydra.callbacks.evil._args_=[VICTIM,w]"],
        ["hydra.callbacks.evil._target_: 'builtins.open' " + NOT_ALLOWED],
    ),
    "launcher": (
        ["-m", "hydra.launcher._target_=builtins.open"],
        ["hydra.launcher._target_: 'builtins.open' " + NOT_ALLOWED],
    ),
    "sweeper": (["-m", "hydra.sweeper._target_=os.system"], ["hydra.sweeper._target_: 'os.system' " + NOT_ALLOWED]),
    "a search's sampler": (
        ["-m", "experiment=search", "hydra.sweeper.sampler._target_=os.system"],
        ["hydra.sweeper.sampler._target_: 'os.system' " + NOT_ALLOWED],
    ),
    "logging class on the command line": (
        ["hydra.hydra_logging.handlers.console.class=os.system"],
        [
            "hydra.hydra_logging.handlers.console.class: 'os.system' is not a class "
            "of Python's logging; valid: logging.FileHandler"
        ],
    ),
    "logging stream importing a module": (
        ["hydra.hydra_logging.handlers.console.stream=ext://antigravity"],
        ["'ext://antigravity' would import a module; valid: ext://sys.stdout, ext://sys.stderr"],
    ),
    "preset in hydra.searchpath": (
        ["hydra.searchpath=[file://CONF]", "experiment=evil"],
        ["hydra.callbacks.evil._target_: 'builtins.open' " + NOT_ALLOWED],
    ),
    "logging config in hydra.searchpath": (
        ["hydra.searchpath=[file://CONF]", "hydra/job_logging=evil"],
        [
            "hydra.job_logging.formatters.f.(): a '()' factory calls any importable function",
            "hydra.job_logging.handlers.h.class: 'os.system' is not a class of Python's logging",
            "hydra.job_logging.handlers.h.stream: 'ext://antigravity' would import a module",
        ],
    ),
    "preset in --config-dir": (
        ["--config-dir", "CONF", "experiment=evil"],
        ["hydra.callbacks.evil._target_: 'builtins.open' " + NOT_ALLOWED],
    ),
    "--config-name": (["-cd", "CONF", "-cn", "evilmain"], ["hydra.launcher._target_: 'builtins.exec' " + NOT_ALLOWED]),
    "--config-path, a plugin's module as a way in": (
        ["-cp", "CONF/alone", "-cn", "alone"],
        ["hydra.callbacks.x._target_: 'hydra_plugins.hydra_joblib_launcher.joblib_launcher.os.system' " + NOT_ALLOWED],
    ),
    "one value of a sweep": (
        ["-m", "hydra.searchpath=[file://CONF]", "experiment=mine,evil"],
        ["with experiment=evil: hydra.callbacks.evil._target_: 'builtins.open' " + NOT_ALLOWED],
    ),
    "--hydra-help configures logging too": (
        ["--hydra-help", "hydra.searchpath=[file://CONF]", "hydra/job_logging=evil"],
        ["hydra.job_logging.formatters.f.(): a '()' factory"],
    ),
    "--experimental-rerun unpickles": (
        ["--experimental-rerun", "VICTIM"],
        ["--experimental-rerun is not supported: it unpickles a file"],
    ),
}


def _fill(args: list[str], evil: Path) -> list[str]:
    return [a.replace("CONF", str(evil / "conf")).replace("VICTIM", str(evil / "victim.txt")) for a in args]


@pytest.mark.parametrize("args, expected", CODE_IN_CONFIG.values(), ids=CODE_IN_CONFIG.keys())
def test_no_config_makes_dnnrun_call_code(evil: Path, args, expected, monkeypatch):
    """The check dnnrun runs before Hydra, in-process (the test below runs two cases through the CLI)."""
    monkeypatch.chdir(evil)
    before = _files(evil)
    problems = "\n".join(cli.check_command_line([*_fill(args, evil), "data=synthetic", "trainer.epochs=1"]))
    for text in expected:
        assert text in problems, (text, problems)
    assert (evil / "victim.txt").read_text() == VICTIM
    assert _files(evil) == before


@pytest.mark.parametrize("case", ["callback on the command line", "preset in --config-dir"])
def test_the_cli_refuses_code_in_a_config_with_exit_2_and_writes_nothing(evil: Path, case):
    args, expected = CODE_IN_CONFIG[case]
    before = _files(evil)
    result = run_cli(*_fill(args, evil), "data=synthetic", "trainer.epochs=1", cwd=evil)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in result.stderr, (text, output)
    assert (evil / "victim.txt").read_text() == VICTIM
    assert _files(evil) == before  # no run directory, no date folder, nothing else


def test_what_is_allowed_still_runs(evil: Path):
    """A preset from hydra.searchpath, Hydra's own logging configs, --cfg, --info, --hydra-help."""
    shown = run_cli("--cfg", "job", f"hydra.searchpath=[file://{evil / 'conf'}]", "experiment=mine", cwd=evil)
    assert shown.returncode == 0, shown.stderr
    assert "epochs: 7" in shown.stdout
    for flags in (["--info", "defaults"], ["--cfg", "hydra", "hydra/job_logging=default"], ["--hydra-help"]):
        assert cli.check_command_line(flags) == [], flags
    run = evil / "run"
    trained = run_cli(
        "data=synthetic", "trainer.epochs=1", "hydra/job_logging=default", f"hydra.run.dir={run}", cwd=evil
    )
    assert trained.returncode == 0, trained.stderr
    assert (run / "summary.json").is_file() and (run / "dnnrun.log").is_file()  # Hydra's FileHandler


def test_a_sweep_directory_outside_the_outputs_root_is_refused_before_anything_is_written(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    result = run_cli(
        "-m", "data=synthetic", "trainer.epochs=1", "act=relu,elu", f"hydra.sweep.dir={outside / 'sw'}", cwd=root
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"error: hydra.sweep.dir resolves to {outside / 'sw'}, outside the outputs root "
        f"{root}; choose a directory under it, or set the root: outputs=DIR"
    )
    assert "Traceback" not in result.stderr and "jobs completed" not in result.stdout
    assert not outside.exists() and not any(root.iterdir())


def test_a_run_directory_outside_the_outputs_root_is_refused_before_anything_is_written(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "out2"
    root.mkdir()
    result = run_cli("data=synthetic", f"hydra.run.dir={outside / 'a' / 'b'}", cwd=root)
    assert result.returncode == 2
    assert f"error: hydra.run.dir resolves to {outside / 'a' / 'b'}, outside the outputs root {root}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not outside.exists() and not any(root.iterdir())


def test_a_run_refused_inside_the_root_leaves_no_empty_date_folder(tmp_path: Path):
    # Refused once it runs (the checkpoint to resume is missing): Hydra has made outputs/<date>/<time>/.
    result = run_cli("data=synthetic", "trainer.resume=/nonexistent/last.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.resume: no checkpoint file at /nonexistent/last.pt" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither <time>/ nor <date>/; the root itself is left


SWEEP_PROBLEMS = {
    "values of two swept keys": (
        ["-m", "optimizer.lr=0.1,-1", "trainer.epochs=abc,2"],
        [
            "invalid config (2 problems)",
            "trainer.epochs: expected an integer, got 'abc'",
            "with optimizer.lr=-1: optimizer.lr: must be > 0, got -1",
        ],
    ),
    "an option and a key": (
        ["optimizer=adamm", "trainer.epochz=3"],
        [
            "invalid config (2 problems)",
            "optimizer=adamm: unknown optimizer option 'adamm'",
            "trainer.epochz: unknown key 'epochz' in trainer",
            "did you mean 'epochs'",
        ],
    ),
    "an option, a key and a value": (
        ["optimizer=adamm", "trainer.epochz=3", "optimizer.lr=-1"],
        ["invalid config (3 problems)", "optimizer=adamm", "trainer.epochz", "optimizer.lr: must be > 0, got -1"],
    ),
    "a key that only one swept option lacks": (
        ["-m", "optimizer=sgd,adam", "optimizer.momentum=0.9"],
        [
            "with optimizer=adam: optimizer.momentum: unknown key 'momentum' in "
            "optimizer; valid: option, name, lr, betas"
        ],
    ),
    "appending a key that exists, in a sweep": (
        ["-m", "+trainer.epochs=1,2"],
        ["Could not append to config. An item is already at 'trainer.epochs'"],
    ),
}


@pytest.mark.parametrize("args, expected", SWEEP_PROBLEMS.values(), ids=SWEEP_PROBLEMS.keys())
def test_every_problem_of_a_sweep_is_listed_before_any_job_runs(tmp_path: Path, args, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = "\n".join(cli.check_command_line([*args, "data=synthetic", f"hydra.sweep.dir={tmp_path / 'sweep'}"]))
    for text in expected[1:] if expected[0].startswith("invalid config") else expected:
        assert text in problems, (text, problems)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_lists_a_sweeps_problems_with_exit_2_and_runs_no_job(tmp_path: Path):
    args, expected = SWEEP_PROBLEMS["values of two swept keys"]
    sweep, run = tmp_path / "sweep", tmp_path / "run"
    result = run_cli(*args, "data=synthetic", f"hydra.sweep.dir={sweep}", f"hydra.run.dir={run}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in result.stderr, (text, output)
    assert list(tmp_path.iterdir()) == []  # no job ran, no directory was made


NO_TORCH = """\
import sys
from dnnrun.cli import check_command_line

good = check_command_line(["-m", "optimizer=adam,nesterov", "act=relu,prelu,selu", "init=he_normal,lecun_normal",
                           "norm=batchnorm", "regularizer=[l2,dropout]", "schedule=onecycle,piecewise_constant",
                           "optimizer.lr=0.01,0.1", "data=synthetic", "data.n_samples=300", "model.hidden=[8,8]",
                           "pretrain=autoencoder", "logger=tensorboard", "trainer.epochs=2"])
bad = check_command_line(["optimizer=adamm", "trainer.epochz=3", "optimizer.lr=-1", "act.alpha=-1"])
heavy = sorted(m for m in ("torch", "matplotlib", "sklearn", "tensorboard", "torchvision") if m in sys.modules)
print(good, len(bad), heavy)
"""


def test_checking_a_command_line_imports_no_torch(tmp_path):
    """Names, keys and every value of a sweep are checked without torch, matplotlib or scikit-learn:
    a typo answers at once. (A process of its own: this one has imported torch long ago.)"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "4", "[]"], done.stdout  # no problem; four problems; no heavy module


def test_a_value_that_hydra_cannot_compose_is_a_problem_not_a_traceback():
    problems = cli.check_command_line(['hydra.sweeper.params={act:"relu,elu"}'])
    assert len(problems) == 1 and "hydra.sweeper.params" in problems[0], problems


PLUGIN_REFUSALS = {
    "a setup shell line": (
        ["-m", "hydra/launcher=slurm", "hydra.launcher.setup=[touch,/tmp/x]"],
        "hydra.launcher.setup: runs as a shell line or a program",
    ),
    "srun arguments": (
        ["-m", "hydra/launcher=slurm", "+hydra.launcher.srun_args=['--prolog=/bin/x']"],
        "hydra.launcher.srun_args: runs as a shell line or a program",
    ),
    "an sbatch option that runs a program": (
        ["-m", "hydra/launcher=slurm", "+hydra.launcher.additional_parameters.prolog=/bin/x"],
        "additional_parameters.prolog: not an sbatch option dnnrun passes on",
    ),
    "a second line in an sbatch value": (
        ["-m", "hydra/launcher=slurm", "hydra.launcher.partition='gpu\nrm -rf ~'"],
        "hydra.launcher.partition: must be one line",
    ),
    "submitit's pickles elsewhere": (
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.submitit_folder=/elsewhere"],
        "hydra.launcher.submitit_folder resolves to /elsewhere, outside the outputs root",
    ),
    "an Optuna database elsewhere": (
        ["-m", "experiment=search", "hydra.sweeper.storage=sqlite:////elsewhere.db"],
        "hydra.sweeper.storage resolves to /elsewhere.db, outside the outputs root",
    ),
    "an Optuna journal elsewhere": (
        ["-m", "experiment=search", "hydra.sweeper.storage=journal:////elsewhere.log"],
        "hydra.sweeper.storage resolves to /elsewhere.log, outside the outputs root",
    ),
    "a storage of another scheme": (
        ["-m", "experiment=search", "hydra.sweeper.storage=redis://host/0"],
        "hydra.sweeper.storage: 'redis://host/0' is not a storage dnnrun can use; valid: sqlite:///PATH",
    ),
    "a password in the storage's URL": (
        ["-m", "experiment=search", "hydra.sweeper.storage=postgresql://me:pw@host/db"],
        "hydra.sweeper.storage: the URL holds a password, which would be written into the run's .hydra/ files",
    ),
    "a pruner that does not exist": (
        ["-m", "experiment=search", "hydra.sweeper.pruner=medain"],
        "hydra.sweeper.pruner: 'medain' is not a pruner; valid: median, hyperband, none (did you mean 'median'?)",
    ),
    "no trials": (["-m", "experiment=search", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials: must be a whole"),
    "members in a search's trials": (
        ["-m", "experiment=search", "trainer.seeds=[0,1]"],
        "trainer.seeds: a search's trial is one run (its value one model's)",
    ),
    "a Slurm signal as late as the time limit": (
        ["-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=1"],
        "hydra.launcher.signal_delay_s: 120 s before a time limit of 60 s (hydra.launcher.timeout_min=1) comes",
    ),
    "a Slurm setting outside the allow-list": (
        ["-m", "hydra/launcher=slurm", "+hydra.launcher.wckey_cmd=x"],
        "hydra.launcher.wckey_cmd: not a setting dnnrun passes to SlurmLauncher",
    ),
    "an unknown launcher setting": (
        ["-m", "hydra/launcher=joblib", "+hydra.launcher.foo=1"],
        "hydra.launcher.foo: not a setting dnnrun passes to JoblibLauncher",
    ),
    "a job log file elsewhere": (
        [
            "+hydra.job_logging.handlers.file.class=logging.FileHandler",
            "+hydra.job_logging.handlers.file.filename=/tmp/any",
        ],
        "hydra.job_logging.handlers.file.filename: '/tmp/any' lies outside the run's",
    ),
    "a Hydra log file elsewhere": (
        [
            "-m",
            "act=relu,elu",
            "+hydra.hydra_logging.handlers.file.class=logging.FileHandler",
            "+hydra.hydra_logging.handlers.file.filename=/tmp/any",
        ],
        "hydra.hydra_logging.handlers.file.filename: '/tmp/any' lies outside",
    ),
}


@pytest.mark.parametrize("case", PLUGIN_REFUSALS)
def test_plugin_settings_that_run_commands_or_write_elsewhere_are_refused(case, tmp_path):
    argv, expected = PLUGIN_REFUSALS[case]
    problems = cli.check_command_line([*argv, f"outputs={tmp_path}"])
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "argv",
    [
        [
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "+hydra.launcher.additional_parameters.mail_type=ALL",
        ],
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["-m", "experiment=search", "hydra.sweeper.storage=sqlite:///{root}/study.db", "hydra.sweeper.n_trials=3"],
        ["-m", "experiment=search", "hydra.sweeper.storage=journal:///{root}/s.log", "hydra.sweeper.pruner=hyperband"],
        ["-m", "experiment=search", "hydra.sweeper.storage=postgresql://me@db.example:5432/studies"],
        [
            "+hydra.job_logging.handlers.file.class=logging.FileHandler",
            "+hydra.job_logging.handlers.file.filename=${{hydra:runtime.output_dir}}/job.log",
        ],
    ],
)
def test_the_allowed_plugin_settings_pass(argv, tmp_path):
    assert cli.check_command_line([*(a.format(root=tmp_path) for a in argv), f"outputs={tmp_path}"]) == []


@pytest.mark.parametrize("subdir", ["../../elsewhere", "/elsewhere/${hydra.job.num}", "${oc.env:HOME}/x"])
def test_a_sweep_subdir_that_leads_out_is_refused_before_any_job(subdir, tmp_path):
    problems = cli.check_command_line(["-m", "act=relu,elu", f"hydra.sweep.subdir={subdir}", f"outputs={tmp_path}"])
    assert any("hydra.sweep.subdir" in p and "lead out of the sweep's directory" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# Hydra's whole namespace on an allow-list

HYDRA_REFUSED = {  # command line: what the one problem must say
    "+hydra.job.env_set.LD_PRELOAD=payload.so": "hydra.job.env_set.LD_PRELOAD: a config may set only OMP_NUM_THREADS",
    "+hydra.job.env_set.CXX=script": "hydra.job.env_set.CXX: a config may set only",
    "+hydra.job.env_set.DNNRUN_FAULT='raise@step=1'": "hydra.job.env_set.DNNRUN_FAULT: a config may set only",
    "+hydra.job.env_set.OMP_NUM_THREADS=two": "hydra.job.env_set.OMP_NUM_THREADS: 'two' is not a value for it",
    "hydra.job.env_copy=[HOME]": "hydra.job.env_copy: HOME: a config may set only",
    "hydra.job.env_copy=[NOT_SET_ANYWHERE]": "hydra.job.env_copy: NOT_SET_ANYWHERE is not set in the environment",
    "hydra.output_subdir=/tmp/elsewhere": "hydra.output_subdir: '/tmp/elsewhere' leads out of the run directory",
    "hydra.output_subdir=../../x": "hydra.output_subdir: '../../x' leads out of the run directory",
    "hydra.job.chdir=true": "hydra.job.chdir: dnnrun keeps the working directory",
    "hydra.job.name=../x": "hydra.job.name: '../x' names files of the job",
    "+hydra.whatever=1": "hydra.whatever: not a Hydra setting a config may change; valid under hydra: run, sweep",
    "+hydra.job.extra=1": "hydra.job.extra: not a Hydra setting a config may change; valid under hydra.job: name",
}


def test_hydras_own_settings_are_on_an_allow_list(tmp_path):
    """Every problem at once (a composition a key: one command line per value of a key given twice):
    each refused override is named with its reason."""
    lines: list[list[str]] = []
    for override in HYDRA_REFUSED:
        key = override.split("=", 1)[0]
        line = next((line for line in lines if all(o.split("=", 1)[0] != key for o in line)), None)
        lines.append([override]) if line is None else line.append(override)
    for line in lines:
        problems = cli.check_command_line([*line, f"outputs={tmp_path}"])
        for override in line:
            assert any(HYDRA_REFUSED[override] in p for p in problems), (override, problems)
    assert list(tmp_path.iterdir()) == []


def test_what_the_allow_list_lets_a_config_set(tmp_path):
    allowed = ["+hydra.job.env_set.OMP_NUM_THREADS=2", "+hydra.job.env_set.CUDA_VISIBLE_DEVICES='0,1'",
               "hydra.output_subdir=.hydra", "hydra.verbose=true", "hydra.job.name=exp1"]  # fmt: skip
    assert cli.check_command_line([*allowed, f"outputs={tmp_path}"]) == []


def test_the_fault_hook_cannot_be_switched_on_from_a_config(tmp_path):
    result = run_cli("+hydra.job.env_set.DNNRUN_FAULT='kill@step=1'", "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 2 and "DNNRUN_FAULT: a config may set only" in result.stderr
    assert list(tmp_path.iterdir()) == []


PARAMS = """\
# @package _global_
hydra:
  sweeper:
    params:
      act: relu,elux
      {hydra_key}: x
"""


@pytest.mark.parametrize("hydra_key", ["hydra.job_logging.handlers.file.filename", "hydra.job.env_set.X"])
def test_a_sweepers_params_are_checked_before_the_first_job(hydra_key, tmp_path):
    """What hydra.sweeper.params sets per job comes from a config file the command line's check
    never saw as overrides: each job's values are checked as the command line's, and a key of
    Hydra's own namespace is refused outright."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "sweep.yaml").write_text(PARAMS.format(hydra_key=hydra_key))
    result = run_cli("-m", "--config-dir", str(tmp_path / "conf"), "experiment=sweep", "trainer.epochs=1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"hydra.sweeper.params.{hydra_key}: a sweep may not set Hydra's own settings per job" in result.stderr
    assert "act=elux: unknown act option 'elux'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no job ran, nothing made


@pytest.mark.parametrize("root", ["afile", "afile/below", "/proc"])
def test_an_outputs_root_that_cannot_be_made_is_refused_without_a_traceback(root, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli(f"outputs={root}", "trainer.epochs=1", cwd=tmp_path, root_at_cwd=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "hydra.run.dir cannot be made:" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["trainer.epochs=${python.eval:'1+1'}"],
        ["hydra.run.dir=${foo.bar:1}"],
        ["-m", "act=relu,elu", "hydra.sweep.dir=${foo.bar:1}"],
        ["hydra.run.dir=${oc.env:DNNRUN_NOT_SET_ANYWHERE}"],
    ],
    ids=["a value", "the run directory", "the sweep directory", "an unset variable"],
)
def test_an_interpolation_that_cannot_resolve_is_refused_without_a_traceback(args, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "Unsupported interpolation type" in result.stderr or "not found" in result.stderr
    assert list(tmp_path.iterdir()) == []
