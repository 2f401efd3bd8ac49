"""dnnrun's Hydra config tree (conf/): where it is, and the resolvers its config.yaml calls.

The resolvers are registered when dnnrun.cli is imported, which every process that composes the
config does first: the command line, its pre-flight check, tests, and the worker processes of
joblib and submitit (they import the task function's module to unpickle it)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _config_dir() -> Path:
    """conf/ inside the installed package (wheel), else the source checkout's top-level conf/."""
    package = Path(__file__).resolve().parent.parent  # dnnrun/
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit(f"dnnrun: no config.yaml in {package / 'conf'} or {package.parent / 'conf'}; reinstall dnnrun")


CONFIG_DIR = _config_dir()


def _plugins_visible() -> None:
    """Hydra finds plugins by listing the folders of the hydra_plugins namespace on sys.path. A
    wheel puts dnnrun's sweeper (hydra_plugins/dnnrun_optuna) into site-packages; an editable
    install (pip install -e) maps it through an import hook that such a listing does not see, so
    the checkout is put at the end of sys.path (where it adds nothing else)."""
    top = Path(__file__).resolve().parents[2]
    if (top / "hydra_plugins" / "dnnrun_optuna").is_dir() and str(top) not in sys.path:
        sys.path.append(str(top))


_plugins_visible()
CONFIG_NAME = "config"  # the primary config: config.yaml

# Paths make unreadable directory names, and a job's directory is found again by its name.
PATH_KEYS = ("transfer.source", "evaluate.checkpoint", "predict.checkpoint", "predict.input")
DIRNAME_EXCLUDED = "dnnrun.dirname_excluded"  # conf/config.yaml: hydra.job.config.override_dirname.exclude_keys
DIGEST = "dnnrun.digest"  # conf/config.yaml: hydra.sweep.subdir, a job's directory: its number and this


def digest(text: str) -> str:
    """8 hex digits naming a job's overrides (hydra.job.override_dirname) in its directory's name:
    short, the same for the same overrides (a re-run finds the job again), the overrides themselves
    in the job's .hydra/overrides.yaml, status.json and the sweep's sweep.csv."""
    return hashlib.sha256(str(text).encode()).hexdigest()[:8]


def dirname_excluded(*, _root_: DictConfig) -> list[str]:
    """The override keys that a sweep job's directory name leaves out: the settings that never
    change a result (dnnrun.store.rundir.RESULT_NEUTRAL), every key under one of them (Hydra matches
    an override's key exactly), and the path-valued keys."""
    from dnnrun.store.rundir import RESULT_NEUTRAL

    plain = OmegaConf.to_container(_root_, resolve=False)  # keys only: no value needs resolving here
    keys: list[str] = []
    for key in RESULT_NEUTRAL:
        node = plain
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        keys += [key, *_keys_under(node, key)]
    return list(dict.fromkeys([*keys, *PATH_KEYS]))


def _keys_under(node: object, prefix: str) -> list[str]:
    if not isinstance(node, dict):
        return []
    keys = []
    for name, child in node.items():
        keys += [f"{prefix}.{name}", *_keys_under(child, f"{prefix}.{name}")]
    return keys


OmegaConf.register_new_resolver(DIRNAME_EXCLUDED, dirname_excluded, replace=True)
OmegaConf.register_new_resolver(DIGEST, digest, replace=True)
