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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.table import Table
from torch import nn

from dnnrun import checkpoint, data as data_mod
from dnnrun.console import console
from dnnrun.errors import ConfigError, UserError
from dnnrun.metrics import write_json
from dnnrun.schema import Problems
from dnnrun.transfer import source_widths

if TYPE_CHECKING:
    from dnnrun.config import RunConfig

log = logging.getLogger("dnnrun")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str | None = None  # the dnnrun checkpoint to evaluate (mode=evaluate)
    split: Literal["test", "val"] = "test"
    mc_samples: int = 0  # > 0: also MC dropout with this many stochastic passes
    bins: int = 15  # confidence bins for the expected calibration error

    def check(self, problems: Problems, key: str) -> None:
        if self.mc_samples < 0:
            problems.add(f"{key}.mc_samples", f"must be >= 0, got {self.mc_samples}")
        if self.bins < 1:
            problems.add(f"{key}.bins", f"must be >= 1, got {self.bins}")


def dropout_on(model: nn.Module) -> int:
    """Evaluation mode everywhere except the dropout layers; returns how many there are."""
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
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
        return torch.stack([
            torch.cat([model(x[i : i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)])
            for _ in range(samples)
        ])
    finally:
        model.eval()


def scores(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, negative log-likelihood, expected calibration error and mean predictive entropy."""
    confidence, predicted = probs.max(1)
    correct = (predicted == y).float()
    nll = -probs.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    ece = torch.zeros((), device=probs.device)
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():  # |accuracy - confidence| in the bin, weighted by its share of the examples
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return {"accuracy": correct.mean().item(), "nll": nll.mean().item(), "ece": ece.item(), "entropy": entropy.mean().item()}


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    from dnnrun.config import parse_run_config
    from dnnrun.train import build_model, resolve_device, seed_everything

    ev = cfg.evaluate
    if ev.checkpoint is None:
        raise UserError("mode=evaluate needs evaluate.checkpoint=PATH (a dnnrun checkpoint)")
    path = Path(ev.checkpoint).expanduser()
    ckpt = checkpoint.load(path)
    try:
        trained = parse_run_config(ckpt["config"])
    except ConfigError as exc:
        raise UserError(f"{path} is not a usable dnnrun checkpoint: the config saved in it is invalid:\n"
                        + "\n".join(f"  - {p}" for p in exc.problems)) from None
    # The model and data as trained; where the data files live is this machine's business.
    data_cfg = dataclasses.replace(trained.data, root=cfg.data.root, download=cfg.data.download)
    trained = dataclasses.replace(trained, data=data_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    data = data_mod.load(data_cfg, device)
    # the widths the weights have (a transferred model's come from its source, not from model.hidden)
    widths = dataclasses.replace(trained.model, hidden=source_widths(ckpt["model"]), depth=None, width=None)
    model, _ = build_model(trained, data, widths)
    checkpoint.load_into(model, ckpt["model"], path)
    model.to(device)
    split = getattr(data, ev.split)
    batch = cfg.trainer.eval_batch_size
    result: dict[str, Any] = {
        "checkpoint": str(path), "split": ev.split, "examples": len(split),
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
            "spread": passes.gather(2, passes.mean(0).argmax(1)[None, :, None].expand(len(passes), -1, 1)).std(0).mean().item(),
        }
        model.eval()
        if result["mc_dropout"]["dropout_layers"] == 0:
            log.warning("the model has no dropout layers: the MC dropout passes equal the deterministic one")
    write_json(run_dir / "evaluation.json", result)
    write_json(run_dir / "summary.json", {"status": "completed", "mode": "evaluate", **result})
    console.print(_table(result))
    return result


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['checkpoint']} on the {result['split']} split ({result['examples']} examples)",
                  title_justify="left")
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
