"""`dnnrun rerun=RUN_DIR [overrides]`: a finished run (or sweep job) again, from the overrides it
was run with (RUN_DIR/.hydra/overrides.yaml, read as YAML: nothing is unpickled, unlike Hydra's
--experimental-rerun), into a new run directory. Overrides given beside it win over the saved
ones of the same key (`dnnrun rerun=RUN trainer.epochs=40` continues the comparison further).

Where the first run read and wrote (`outputs`, `data.root`, `data.download`, any `hydra.*`: its run
directory, its logging) is not taken from the saved overrides: a run directory copied from
elsewhere could name any place. The re-run writes where this command line says, and its overrides
pass the same check as a command line's.

The saved overrides must still compose the config the run had: when this dnnrun's defaults have
changed since, the settings that differ are listed and nothing runs, since an exact re-run is
then impossible (run it with the dnnrun that made it)."""

from __future__ import annotations

from pathlib import Path

from dnnrun.errors import UserError

KEY = "rerun"
# a re-run starts afresh, and where it reads and writes is this command line's
NOT_RERUN = ("trainer.resume", "trainer.force_resume", "outputs", "data.root", "data.download", "hydra")


def expand(argv: list[str]) -> list[str]:
    """The command line with rerun=RUN replaced by that run's overrides; unchanged without one."""
    given = [a for a in argv if a.startswith(f"{KEY}=")]
    if not given:
        return argv
    if len(given) > 1:
        raise UserError(f"{KEY}: name one run directory, got {len(given)}")
    if {"-m", "--multirun"} & set(argv):
        raise UserError(f"{KEY}: runs one finished run again; it cannot be part of a sweep (-m)")
    run = Path(given[0].split("=", 1)[1]).expanduser()
    saved = _saved_overrides(run)
    rest = [a for a in argv if not a.startswith(f"{KEY}=")]
    kept = [o for o in saved if not any(_key(o) == k or _key(o).startswith((f"{k}.", f"{k}/")) for k in NOT_RERUN)]
    _check_composes_as_saved(run, kept)
    given_keys = {_key(a) for a in rest if "=" in a}
    return [*(o for o in kept if _key(o) not in given_keys), *rest]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _saved_overrides(run: Path) -> list[str]:
    import yaml

    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        why = "no such directory" if not run.is_dir() else "it has no .hydra/overrides.yaml"
        raise UserError(f"{KEY}={run}: {why}; name a dnnrun run directory (outputs/DATE/TIME, or a sweep job's)")
    try:
        saved = yaml.safe_load(path.read_text()) or []
    except (yaml.YAMLError, OSError) as exc:
        raise UserError(f"{KEY}: cannot read {path} ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise UserError(f"{KEY}: {path} is not a list of overrides (strings), as dnnrun writes it")
    return saved


def _check_composes_as_saved(run: Path, overrides: list[str]) -> None:
    """Refuse when the overrides now compose another config than the run's (.hydra/config.yaml),
    in a setting that changes the result."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dnnrun.cli.conf import CONFIG_DIR, CONFIG_NAME
    from dnnrun.training.checkpointing import config_changes

    try:
        saved = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=True)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            now = OmegaConf.to_container(compose(CONFIG_NAME, overrides=overrides), resolve=True)
    except (HydraException, OmegaConfBaseException, OSError) as exc:
        raise UserError(
            f"{KEY}: {run}'s overrides do not compose a config with this dnnrun ({' '.join(str(exc).split())[:300]})"
        ) from None
    changes = config_changes(saved, now, where="the run")
    if changes:
        raise UserError(
            f"{KEY}: {run}'s overrides now compose another config than the one it ran with (dnnrun's "
            "defaults have changed since), so it cannot run again exactly:\n  - "
            + "\n  - ".join(changes)
            + "\nRun it with the dnnrun version it was made with, or give the settings as overrides."
        )
