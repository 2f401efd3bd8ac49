"""hydra/sweeper=optuna: dnnrun's Optuna sweeper (the search itself: dnnrun/cli/search.py).

Registered with Hydra here, with its settings and defaults (docs/sweeps-and-clusters.md). Importing this
module is cheap: Hydra imports every plugin module at start-up; Optuna is imported by the search."""

# No `from __future__ import annotations`: Hydra runs this module without registering it in
# sys.modules, where dataclasses look string annotations up; OmegaConf reads typing's Optional.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING, DictConfig


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.dnnrun_optuna.optuna_sweeper.OptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random, or hydra.sweeper.sampler._target_=optuna.samplers.NAME
    direction: str = "minimize"  # or maximize (trainer.monitor=val/acc)
    n_trials: int = 20  # the study's total, over every process that works on it
    n_jobs: int = 1  # trials launched at once (hydra/launcher=joblib or slurm runs them in parallel)
    pruner: str = "median"  # median, hyperband or none: stops trials behind the others after an epoch
    storage: Optional[str] = (
        None  # sqlite:///PATH, journal:///PATH, postgresql://USER@HOST/DB; null: SWEEP/optuna.journal
    )
    study_name: Optional[str] = None  # null: dnnrun-search; the same name and storage share one study
    max_failure_rate: float = 1.0  # stop asking for trials once more of this process's trials failed than this
    params: Optional[Dict[str, str]] = None  # key: Hydra sweep syntax (choice, range, interval, tag(log, ...))


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="dnnrun")
ConfigStore.instance().store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="dnnrun")
ConfigStore.instance().store(group="hydra/sweeper/sampler", name="random", node=RandomSamplerConf, provider="dnnrun")


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, **settings: Any) -> None:
        self.sampler = sampler  # instantiated by Hydra: an optuna.samplers class, the config check allows no other

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from dnnrun.cli.search import Search

        search = Search(
            self.config.hydra.sweeper,
            self.config.hydra.sweep.dir,
            launch=self.launcher.launch,
            # a launcher that runs jobs elsewhere (joblib, Slurm): each job's config composed here first
            validate=self.validate_batch_is_legal if not _in_process(self.config) else lambda jobs: None,
            sampler=self.sampler,
        )
        search.run(arguments)


def _in_process(config: DictConfig) -> bool:
    """Hydra's basic launcher, which composes and runs each job here, at once."""
    return config.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
