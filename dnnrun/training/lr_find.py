"""The learning-rate range test (Smith 2015): train for a few hundred steps while the rate grows
exponentially from very small to very large, and watch the loss fall, flatten, then explode.

`dnnrun mode=lr_find` writes lr_find.json and plots/lr_find.png into its own run directory and
prints a suggested rate: a tenth of the rate where the smoothed loss is lowest. It writes no
checkpoint, so it never touches a training run's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dnnrun.config.run_config import LRFindConfig, RunConfig
from dnnrun.data.datasets import Split
from dnnrun.insight.console import console
from dnnrun.optim import optimizers as optim
from dnnrun.store.rundir import RunDir
from dnnrun.training import runtime

log = logging.getLogger("dnnrun")


def find(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    batch_size: int,
    cfg: LRFindConfig,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Run the range test; the model and optimizer are spent afterwards."""
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    growth = (cfg.end_lr / cfg.start_lr) ** (1 / (cfg.steps - 1))
    lrs, losses, smoothed = [], [], []
    average, best, stop = 0.0, math.inf, "reached end_lr"
    model.train()
    for t, (xb, yb) in enumerate(_endless_batches(split, batch_size, generator)):
        if t == cfg.steps:
            break
        lr = cfg.start_lr * growth**t
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = F.cross_entropy(model(xb), yb)
        value = loss.item()
        if not math.isfinite(value):
            stop = "the loss became non-finite"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average = cfg.smoothing * average + (1 - cfg.smoothing) * value
        smooth = average / (1 - cfg.smoothing ** (t + 1))  # bias-corrected moving average
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > cfg.diverge_factor * best:
            stop = f"the smoothed loss exceeded {cfg.diverge_factor:g}x its minimum"
            break
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed, "stopped": stop, **suggest(lrs, smoothed)}


def _endless_batches(split: Split, batch_size: int, generator: torch.Generator):
    """Shuffled mini-batches, epoch after epoch, for as many steps as the test wants."""
    while True:
        yield from split.batches(batch_size, generator)


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, Any]:
    """The rate a tenth of the one where the smoothed loss is lowest, as the classic rule has it: at
    the minimum, training is already about to blow up, and one decade lower the loss still falls
    fast. (The steepest point of the curve is noise-driven where the curve is flat.)"""
    if len(lrs) < 3:
        return {"suggestion": None, "min_loss_lr": lrs[-1] if lrs else None}
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    target = lrs[low] / 10
    at = min(range(low + 1), key=lambda i: abs(math.log(lrs[i] / target)))  # the recorded rate nearest to it
    return {"suggestion": lrs[at], "min_loss_lr": lrs[low], "falling": [lrs[0], lrs[low]]}


def run(cfg: RunConfig, run_dir: str | Path, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """The test on the model the config describes, freshly initialized (without transfer.source or
    pretraining: the test is about the optimizer and its rate, and it spends the model). The device
    and the data are checked before the directory is written, then `on_start` runs."""
    tc, run_dir = cfg.trainer, RunDir(run_dir)
    device = runtime.resolve_device(tc.device)
    runtime.seed_everything(tc.seed, tc.deterministic)
    data = runtime.load_data(cfg.data, cfg.model, device)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    if on_start is not None:
        on_start()
    log.info("lr_find: output directory %s (on %s)", run_dir, runtime.device_name(device))
    log.info("%s", cfg.options())
    model, _ = runtime.build_model(cfg, data)
    model.to(device)
    optimizer = optim.build(cfg.optimizer, model)
    result = find(model, optimizer, data.train, tc.batch_size, cfg.lr_find, torch.Generator().manual_seed(tc.seed))
    result.update(
        optimizer=cfg.optimizer.option or cfg.optimizer.name, batch_size=tc.batch_size, steps=len(result["lrs"])
    )
    run_dir.write_lr_find(result)
    from dnnrun.insight.plots import lr_find_plot  # matplotlib is imported only when plots are drawn

    run_dir.plots.mkdir(exist_ok=True)
    lr_find_plot(result, run_dir.plot("lr_find"))
    run_dir.write_summary(
        {
            "status": "completed",
            "mode": "lr_find",
            "suggestion": result["suggestion"],
            "min_loss_lr": result["min_loss_lr"],
            "stopped": result["stopped"],
        }
    )
    if result["suggestion"] is None:
        console.print(f"lr_find: the loss exploded after {len(result['lrs'])} steps; start lower (lr_find.start_lr)")
    else:
        console.print(
            f"lr_find: {len(result['lrs'])} steps, stopped because {result['stopped']}; the smoothed loss is lowest "
            f"at lr {result['min_loss_lr']:.2e}, and a tenth of that is a safe rate.\n"
            f"Suggested: optimizer={result['optimizer']} optimizer.lr={result['suggestion']:.2g}   "
            f"(curve: {run_dir.plot('lr_find')})"
        )
    log.info("written: %s, %s", run_dir.lr_find, run_dir.plot("lr_find"))
    return result
