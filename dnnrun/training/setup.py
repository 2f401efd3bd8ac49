"""What comes before the loop: the checks that can refuse a run before it writes anything
(`prepare`), then, once the run owns its directory, the engine with the weights it starts from
(`build`): a fresh initialization, transfer.source's or model.weights' layers, pretraining, or a
checkpoint's weights (those are loaded by the loop's Checkpoints)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dnnrun.errors import UserError
from dnnrun.models.registry import MODELS, fitting_config
from dnnrun.store import checkpoint
from dnnrun.training import checkpointing, distributed, pretrain, runtime, transfer
from dnnrun.training.engine import STACKED
from dnnrun.training.transfer import Reuse

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig, TrainerConfig
    from dnnrun.data.datasets import Data
    from dnnrun.store.rundir import RunDir

log = logging.getLogger("dnnrun")


@dataclasses.dataclass
class Start:
    """What a run starts from, each part checked before anything is written."""

    data: Data
    model_cfg: Any  # cfg.model, with the widths of the checkpoint or of the transfer source
    checkpoint: dict[str, Any] | None = None  # the checkpoint to resume ...
    resume_from: Path | None = None  # ... and its file
    source: dict[str, torch.Tensor] | None = None  # the transfer source's weights (model=zoo: model.weights)


def seeds(tc: TrainerConfig) -> list[int]:
    """The seed of each member: trainer.seeds, or a single run's trainer.seed."""
    return list(tc.seeds) if tc.seeds else [tc.seed]


def steps_per_epoch(tc: TrainerConfig, examples: int) -> int:
    batches = math.ceil(examples / tc.batch_size)
    return min(batches, tc.limit_batches or batches)


def prepare(cfg: RunConfig, run_dir: RunDir, device: torch.device) -> Start:
    """The checkpoint to resume, the data, the transfer source, and the model's config, whose
    shapes their weights must fit (checked on the meta device: no memory, no random numbers)."""
    members = len(seeds(cfg.trainer))
    if members > 1 and distributed.rank_world()[1] > 1:
        raise UserError(f"trainer.seeds: members cannot run under torchrun ({STACKED.distributed}); run them in one "
                        "process, or train the seeds as separate runs")  # fmt: skip
    resume_from = checkpointing.checkpoint_to_resume(cfg.trainer.resume, run_dir)
    ckpt = checkpointing.load_resumable(resume_from, cfg, device) if resume_from is not None else None
    start = Start(runtime.load_data(cfg.data, cfg.model, device), cfg.model, ckpt, resume_from)
    own = MODELS[cfg.model.name].weights
    if ckpt is not None:  # a resumed run has the reused weights in its checkpoint
        if members == 1:
            start.model_cfg = fitting_config(cfg.model, ckpt["model"])
    elif own is not None and own.named(cfg.model):
        start.source = own.load(cfg.model)
    elif cfg.transfer.source:
        start.source, trained_with = transfer.load_source(cfg.transfer)
        act = (trained_with.get("act") or {}).get("name")
        if act is not None and act != cfg.act.name:  # it fits, but its weights were learned for another unit
            log.warning("transfer.source was trained with act=%s; this run uses act=%s", act, cfg.act.name)
        start.model_cfg = transfer.model_config(cfg.model, cfg.transfer, start.source)
    with torch.device("meta"):
        shapes, _ = runtime.build_model(cfg, start.data, start.model_cfg)
    if (too_big := runtime.memory_problem(shapes, cfg, device, start.data.shape, members)) is not None:
        raise UserError(too_big)
    if ckpt is not None:
        checkpoint.check_fits(shapes, ckpt["model"], resume_from, members)
    elif start.source is not None and own is not None:
        own.check(start.source, shapes, cfg.model, cfg.transfer.layers)
    elif start.source is not None:
        transfer.check_fits(
            start.source,
            transfer.reused_layers(cfg.transfer, start.source),
            {name: t.shape for name, t in shapes.state_dict().items()},
        )
    return start


def build(cfg: RunConfig, start: Start, device: torch.device, steps: int, summary: dict[str, Any], run_dir: RunDir):
    """(the engine, what it reused): the members' stacked engine, or a module's, its model seeded
    and initialized as trainer.seed says, given the layers of transfer.source or model.weights and
    pretrained (a fresh run), or as the checkpoint's run had it (a resumed one). Process-wide
    settings first: threads, anomaly detection."""
    tc = cfg.trainer
    torch.autograd.set_detect_anomaly(tc.detect_anomaly)
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    if tc.seeds:
        from dnnrun.training.members import StackedEngine

        return StackedEngine(cfg, start.data, device, steps), Reuse()
    from dnnrun.training.module_engine import ModuleEngine

    runtime.seed_everything(tc.seed, tc.deterministic)
    model, reg = runtime.build_model(cfg, start.data, start.model_cfg)
    model.to(device)
    reuse, own = Reuse(), MODELS[cfg.model.name].weights
    if start.source is not None and own is not None:
        reuse.reused, reuse.reused_layers = own.reuse(model, start.source, cfg.model, cfg.transfer.layers)
    elif start.source is not None:
        reuse.reused_layers = transfer.reused_layers(cfg.transfer, start.source)
        reuse.reused = transfer.reuse(model, start.source, reuse.reused_layers, cfg.transfer.source)
    elif start.checkpoint is not None:  # what the checkpoint's run reused: its param groups are the optimizer's
        saved = start.checkpoint["callbacks"].get("unfreezing", {})
        checkpoint.check_entry(start.resume_from, "callbacks.unfreezing", saved, checkpoint.entries(Reuse))
        reuse = Reuse(**saved)
    if reuse.reused:
        summary["transfer"] = transfer.summary(cfg, reuse.reused_layers, start.model_cfg.widths)
    if start.checkpoint is None and cfg.pretrain.name != "none":
        summary["pretrain"] = pretrain.run(cfg.pretrain, model, start.data.unlabeled, start.data.shape, tc.seed)
        inputs = start.data.preprocess.to_dict() if start.data.preprocess else None
        checkpoint.save(run_dir.pretrained, {"model": model.state_dict(), "config": cfg.raw, "inputs": inputs})
    return ModuleEngine(cfg, model, reg, device, steps, reuse.reused), reuse
