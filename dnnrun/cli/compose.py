"""Hydra's config loader, set up through Hydra's public API as @hydra.main sets it up for a
command line: the same primary config (dnnrun's conf/, --config-path, --config-name) and the same
search path (--config-dir, hydra.searchpath), so that a check composes what Hydra will compose."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dnnrun.cli.conf import CONFIG_DIR
from dnnrun.cli.messages import explain

JOB_NAME = "dnnrun"  # hydra.job.name, also set in conf/config.yaml
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)  # what composing raises for a bad config


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse(text: str):
    """One override, as Hydra parses it (an Override; HydraException if it is not one)."""
    return _parser().parse_override(text)


def quoted(text: str) -> str:
    """A quoted string of Hydra's override grammar: inside quotes, backslashes escape only a quote
    or the end of the string, and so do the backslashes before those."""
    body = re.sub(r"(\\+)(?='|$)", lambda m: m[1] * 2, text).replace("'", "\\'")
    return f"'{body}'"


class Refused(Exception):
    """A flag that leaves nothing to compose."""


class Composer:
    """Hydra's ConfigLoader for this command line. `base`: the overrides that come before every
    other, the hydra.searchpath that --config-dir and the command line amount to."""

    def __init__(self, loader, config_name: str, base: list[str]):
        self.loader, self.config_name, self.base = loader, config_name, base

    def is_group(self, key: str) -> bool:
        return bool(
            self.loader.get_group_options(key, results_filter=None, config_name=self.config_name, overrides=self.base)
        )

    def options(self, group: str, nested: bool = False) -> list[str]:
        """A group's options; nested=True: those in its folders too, as Hydra selects them
        (experiment=chapter/prelu). Each listing composes the config: a folder costs two more."""
        from hydra.core.object_type import ObjectType

        def listed(kind) -> list[str]:
            return self.loader.get_group_options(
                group, results_filter=kind, config_name=self.config_name, overrides=self.base
            )

        found = listed(ObjectType.CONFIG)
        if nested:
            found += [
                f"{sub}/{name}" for sub in listed(ObjectType.GROUP) for name in self.options(f"{group}/{sub}", True)
            ]
        return sorted(found)

    def compose(self, overrides: list, mode) -> DictConfig:
        try:
            return self.loader.load_configuration(
                self.config_name, [*self.base, *(o.input_line for o in overrides)], mode, validate_sweep_overrides=False
            )
        except AttributeError as exc:  # OmegaConf validating some values of Hydra's nodes: hydra.sweeper.params={...}
            raise HydraException(" ".join(str(exc).split())) from None
        except KeyError as exc:  # hydra.job.env_copy naming a variable the environment lacks
            raise HydraException(f"hydra.job.env_copy: {exc.args[0]} is not set in the environment") from None

    def sweep_problems(self, parsed: list) -> list[str]:
        """Hydra's refusal of a sweep in a single run (ambiguous or needing --multirun)."""
        from hydra.types import RunMode

        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if not sweeps:
            return []
        try:  # Hydra checks the overrides before it composes: only the first sweep's message comes back
            self.loader.load_configuration(self.config_name, [*self.base, *sweeps], RunMode.RUN)
        except COMPOSE_ERRORS as exc:
            return [explain(exc)]
        return []


@contextlib.contextmanager
def composer_for(config_path: str | None, config_dir: str | None, config_name: str, parsed: list) -> Iterator[Composer]:
    """A composer with the search path @hydra.main builds for these flags: hydra's own configs,
    the primary config dir (dnnrun's conf/, or --config-path), the plugins', then --config-dir
    and hydra.searchpath's entries."""
    main, base = _search_path(_primary(config_path), config_dir, config_name, parsed)
    with _initialized(main) as loader:
        yield Composer(loader, config_name, base)


@contextlib.contextmanager
def _initialized(main: str):
    """Hydra initialized with this primary config dir (absolute) or module (pkg://a.b); its ConfigLoader."""
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if main.startswith("pkg://"):
        initialized = initialize_config_module(
            config_module=main.removeprefix("pkg://"), job_name=JOB_NAME, version_base="1.3"
        )
    else:
        initialized = initialize_config_dir(config_dir=main, job_name=JOB_NAME, version_base="1.3")
    with initialized:
        yield GlobalHydra.instance().config_loader()


def _primary(config_path: str | None) -> str:
    """The primary config dir (absolute) or module (pkg://a.b) that Hydra reads --config-path as:
    absolute, pkg://, or relative to the package of the task function."""
    if config_path is None:
        return str(CONFIG_DIR)
    if os.path.isabs(config_path):
        return config_path
    if config_path.startswith("pkg://"):
        module = config_path.removeprefix("pkg://")
    else:
        package = __name__.split(".")[:-1]  # the task function's package: App.task is in app.py, beside this file
        parts = config_path.replace(os.path.sep, "/").split("/")
        while parts[:1] == [".."]:
            parts, package = parts[1:], package[:-1]
        module = "/".join([".".join(package), *parts]) if package else "/".join(parts)
    return "pkg://" + module.replace("/", ".").rstrip(".")


def _search_path(primary: str, config_dir: str | None, config_name: str, parsed: list) -> tuple[str, list[str]]:
    """(the primary config dir or module to initialize Hydra with, the hydra.searchpath overrides
    that every composition starts with).

    With --config-dir DIR, Hydra reads DIR after the primary config dir and the plugins' and
    before hydra.searchpath's entries (the command line's, else the primary config file's own):
    through the public API, that place is hydra.searchpath=[file://DIR, ...]. When the primary
    config file is in DIR alone, the loader could not find it there (it looks for the primary
    config before it adds hydra.searchpath's entries): DIR becomes the primary config dir and the
    primary config dir goes first in hydra.searchpath, the same search unless a config is in both."""
    given = [o for o in parsed if o.key_or_group == "hydra.searchpath"]
    if config_dir is None:
        return primary, [o.input_line for o in given]
    extra = os.path.abspath(config_dir)
    if not os.path.isdir(extra):
        raise Refused(f"--config-dir: no directory {extra}")
    file = Path(extra) / (config_name if config_name.endswith(".yaml") else f"{config_name}.yaml")
    with _initialized(primary) as loader:
        sources = [s for s in loader.get_sources() if s.provider != "schema"]
        schema = [s for s in loader.get_sources() if s.provider == "schema"]
        home = next((s for s in sources if s.is_config(config_name)), None)
        if home is None and file.is_file():
            shadowed = [
                name
                for name in _config_names(Path(extra))
                for s in sources
                if s.provider != "hydra" and s.is_config(name) and not _same_file(s, name, Path(extra))
            ]
            if shadowed:
                raise Refused(
                    f"--config-dir: {extra} and the primary config dir {primary} both hold "
                    f"{', '.join(f'{n}.yaml' for n in shadowed)}, which differ; dnnrun cannot check the "
                    f"one Hydra reads with --config-name {config_name}; rename them, or use "
                    f"--config-path {extra}"
                )
            main, first = extra, primary if primary.startswith("pkg://") else f"file://{primary}"
            content = _read(lambda: OmegaConf.load(file))
        else:
            home = home or next((s for s in schema if s.is_config(config_name)), None)
            main, first = primary, f"file://{extra}"
            content = _read(lambda: home.load_config(config_name).config) if home is not None else None
    own = next((o for o in given if o.get_key_element() == "hydra.searchpath"), None)  # the one Hydra reads
    entries = own.value() if own is not None else _own_searchpath(content)
    entries = [] if entries is None else entries
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        return main, [o.input_line for o in given]  # Hydra refuses it: composing says why
    items = [first, *entries]
    line = f"hydra.searchpath=[{','.join(quoted(i) for i in items)}]"
    if any("${" in i for i in items) or parse(line).value() != items:
        raise Refused(f"--config-dir: {extra} cannot be checked (a path Hydra would read as an interpolation)")
    return main, [line, *(o.input_line for o in given if o is not own)]


def _config_names(folder: Path) -> list[str]:
    """The configs in a directory, by the name Hydra loads them with (group/option)."""
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def _same_file(source, name: str, folder: Path) -> bool:
    """Whether a config source holds this config of a directory as the very same text (a copy)."""
    if source.scheme() != "file":
        return False
    try:
        return (Path(source.path) / f"{name}.yaml").read_bytes() == (folder / f"{name}.yaml").read_bytes()
    except OSError:
        return False


def _read(load):
    """A primary config file's content; None when it cannot be read: composing says why."""
    try:
        return load()
    except Exception:  # YAML, OmegaConf and Hydra each raise their own
        return None


def _own_searchpath(primary: object) -> object:
    """The primary config file's own hydra.searchpath, as Hydra reads it."""
    if not isinstance(primary, DictConfig):
        return None  # Hydra refuses a primary config that is no mapping: composing says why

    def read() -> object:
        value = OmegaConf.select(primary, "hydra.searchpath")
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    return _read(read)
