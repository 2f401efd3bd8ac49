"""Evaluating a checkpoint on a split, deterministically and with MC dropout.

`dnnrun mode=evaluate evaluate.checkpoint=PATH evaluate.mc_samples=30` rebuilds the model from
the checkpoint's own config, evaluates it with dropout off (the usual prediction) and, with
mc_samples=K, averages K forward passes with dropout on (batch norm stays in evaluation mode):
Monte Carlo dropout (Gal & Ghahramani 2016). It reports accuracy, negative log-likelihood,
expected calibration error and predictive entropy for both, in the terminal and evaluation.json.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from dnnrun.config.run_config import RunConfig
from dnnrun.data.datasets import DEFAULT_ROOT
from dnnrun.errors import UserError
from dnnrun.insight.console import console
from dnnrun.models.network import DROPOUTS
from dnnrun.models.registry import fitting_config
from dnnrun.store import checkpoint
from dnnrun.store.rundir import RunDir
from dnnrun.training import runtime
from dnnrun.training.metrics import scores

log = logging.getLogger("dnnrun")


def dropout_on(model: nn.Module) -> int:
    """Evaluation mode everywhere except the dropout layers; returns how many there are."""
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, DROPOUTS)]
    for m in layers:
        m.train()
    return len(layers)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, samples: int = 0) -> torch.Tensor:
    """Class probabilities (N, C): one deterministic pass, or with samples=K the K passes with dropout
    on, stacked (K, N, C)."""
    if samples == 0:
        model.eval()
        return torch.cat([model(x[i : i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)])
    dropout_on(model)
    try:
        return torch.stack(
            [
                torch.cat([model(x[i : i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)])
                for _ in range(samples)
            ]
        )
    finally:
        model.eval()


def run(cfg: RunConfig, run_dir: str | Path, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Evaluate evaluate.checkpoint; everything that can refuse it (the checkpoint, its config, the
    device, the data) is checked before the directory is written, then `on_start` runs (the CLI
    writes Hydra's config snapshot)."""
    ev, run_dir = cfg.evaluate, RunDir(run_dir)
    if ev.checkpoint is None:
        raise UserError("mode=evaluate needs evaluate.checkpoint=PATH (a dnnrun checkpoint or run directory)")
    path = Path(ev.checkpoint).expanduser()
    if path.is_dir():  # a run directory: its best.pt, as mode=predict and dnnrun.load take it
        path = RunDir(path).best
        if not path.is_file():
            raise UserError(
                f"evaluate.checkpoint: {path.parent.parent} has no checkpoints/best.pt: is it a run directory?"
            )
    ckpt = checkpoint.load(path)
    trained = checkpoint.run_config(ckpt, path)
    # The model and data as trained, as Lightning's load_from_checkpoint restores the saved
    # hyperparameters unless told otherwise. Where the files live: the command line's data.root,
    # else $DNNRUN_DATA, else the checkpoint's own root. Every conf/data/*.yaml (and DataConfig's
    # default) resolves root to `data.root=... if given, else $DNNRUN_DATA, else DEFAULT_ROOT`, so
    # the composed root already ranks the first two; only DEFAULT_ROOT means "neither said", and
    # the checkpoint's root is taken then (data.root=~/.cache/dnnrun-data spelt out reads the same).
    # Downloading: the checkpoint's setting, unless data.download=false here forbids it (true is
    # the composed default, so it cannot override a checkpoint trained with download=false); never
    # into the checkpoint's own root, which a file from elsewhere could set to any place.
    own_root = cfg.data.root != DEFAULT_ROOT
    root = cfg.data.root if own_root else trained.data.root
    data_cfg = dataclasses.replace(
        trained.data, root=root, download=trained.data.download and cfg.data.download and own_root
    )
    trained = dataclasses.replace(trained, data=data_cfg)
    device = runtime.resolve_device(cfg.trainer.device)
    runtime.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    data = runtime.load_data(data_cfg, trained.model, device)
    model, _ = runtime.build_model(trained, data, fitting_config(trained.model, ckpt["model"]))
    checkpoint.load_into(model, ckpt["model"], path)
    model.to(device)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    log.info(
        "evaluate %s on the %s split; output directory: %s (on %s)",
        path,
        ev.split,
        run_dir,
        runtime.device_name(device),
    )
    log.info("as trained: %s", trained.options())
    split = getattr(data, ev.split)
    batch = cfg.trainer.eval_batch_size
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "split": ev.split,
        "examples": len(split),
        "deterministic": scores(predict(model, split.x, batch), split.y, ev.bins),
    }
    if ev.mc_samples:
        passes = predict(model, split.x, batch, ev.mc_samples)
        result["mc_dropout"] = {
            **scores(passes.mean(0), split.y, ev.bins),
            "samples": ev.mc_samples,
            "dropout_layers": dropout_on(model),
            # how much the passes disagree: std over passes of each example's probability for its
            # predicted class, averaged over examples (0 without dropout)
            "spread": passes.gather(2, passes.mean(0).argmax(1)[None, :, None].expand(len(passes), -1, 1))
            .std(0)
            .mean()
            .item(),
        }
        model.eval()
        if result["mc_dropout"]["dropout_layers"] == 0:
            log.warning("the model has no dropout layers: the MC dropout passes equal the deterministic one")
    run_dir.write_evaluation(result)
    run_dir.write_summary({"status": "completed", "mode": "evaluate", **result})
    console.print(_table(result))
    log.info("written: %s", run_dir.evaluation)
    return result


def _table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"{result['checkpoint']} on the {result['split']} split ({result['examples']} examples)",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("deterministic", justify="right")
    mc = result.get("mc_dropout")
    if mc:
        table.add_column(f"MC dropout ({mc['samples']} passes)", justify="right")
    for name in ("accuracy", "nll", "ece", "entropy"):
        row = [name, f"{result['deterministic'][name]:.4f}"]
        if mc:
            row.append(f"{mc[name]:.4f}")
        table.add_row(*row)
    return table
