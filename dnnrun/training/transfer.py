"""Transfer learning: start from the hidden layers of another run's checkpoint.

The new model keeps the source's first `layers` hidden layers (their widths and weights), can
re-initialize one of them (`replace`), stacks `add` new hidden layers on top and always gets a new
output layer for this run's classes. This run's act/norm/regularizer groups build the layers, so
they must match the source's where weights are reused (a shape mismatch is reported).
Reused layers can be frozen, then unfrozen after some epochs with a smaller learning rate
(Unfreezing, a callback of the loop).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dnnrun.errors import UserError
from dnnrun.models.network import Network
from dnnrun.models.registry import MODELS, affine_weight, hidden_widths
from dnnrun.store import checkpoint
from dnnrun.techniques.norms import is_batch_norm
from dnnrun.training.callbacks import Callback

if TYPE_CHECKING:
    from dnnrun.config.run_config import RunConfig, TransferConfig
    from dnnrun.training.loop import Loop

log = logging.getLogger("dnnrun")


def load_source(cfg: TransferConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The source checkpoint's model state dict and its run's config (read with weights_only=True)."""
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise UserError(f"transfer.source: no checkpoint file at {path}")
    loaded = checkpoint.load(path)
    return loaded["model"], loaded["config"]


def reused_layers(cfg: TransferConfig, state: dict[str, torch.Tensor]) -> list[int]:
    """1-based indices of the hidden layers whose weights are copied."""
    available = len(hidden_widths(state))
    if available == 0:
        raise UserError(f"transfer.source: {cfg.source} has no hidden layers to reuse (no hidden1.linear.weight)")
    k = available if cfg.layers is None else cfg.layers
    if k > available:
        raise UserError(f"transfer.layers={k}, but the source has {available} hidden layers")
    if cfg.replace is not None and cfg.replace > k:
        raise UserError(f"transfer.replace={cfg.replace} is not among the {k} reused hidden layers")
    return [i for i in range(1, k + 1) if i != cfg.replace]


def model_config(model, cfg: TransferConfig, state: dict[str, torch.Tensor]):
    """An MLP: the source's first k widths (the replaced layer keeps its width), then the added
    layers. A conv net's blocks are this run's config (check_fits says where they differ)."""
    if not hasattr(model, "hidden"):
        if cfg.add:
            raise UserError(
                f"transfer.add stacks dense layers on a reused MLP; for model={model.name} give the new "
                "layers in the model's own config (model.head for model=cnn)"
            )
        return model
    widths = hidden_widths(state)
    k = len(widths) if cfg.layers is None else cfg.layers
    return dataclasses.replace(model, hidden=widths[:k] + list(cfg.add), depth=None, width=None)


def check_fits(
    state: dict[str, torch.Tensor], layers: list[int], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """The source tensors to copy into a model whose state has these shapes; a source that does
    not fit is refused with every difference (run before the run writes anything)."""
    source_in, this_in = affine_weight(state, "hidden1"), affine_weight(shapes, "hidden1")
    if this_in is not None and source_in.dim() != len(this_in):
        raise UserError(
            f"transfer.source's hidden1 is {'a conv' if source_in.dim() == 4 else 'a dense'} layer, "
            f"this model's {'a conv' if len(this_in) == 4 else 'a dense'} one: reuse a source of the same "
            "model (model=mlp from an MLP, model=cnn from a CNN)"
        )
    if this_in is not None and source_in.shape[1] != this_in[1]:
        what = "channels" if source_in.dim() == 4 else "features"
        raise UserError(
            f"transfer.source was trained on inputs of {source_in.shape[1]} {what}; this run's data has "
            f"{this_in[1]}. Transfer needs the same inputs (same dataset family and image size)."
        )
    prefixes = [f"hidden{i}." for i in layers] + ["input_norm."]
    copied, problems = {}, []
    for name, tensor in state.items():
        if not name.startswith(tuple(prefixes)):
            continue
        if name not in shapes:
            problems.append(f"{name} is in the source but not in this model")
        elif shapes[name] != tensor.shape:
            problems.append(f"{name}: source {tuple(tensor.shape)}, this model {tuple(shapes[name])}")
        else:
            copied[name] = tensor
    missing = [n for n in shapes if n.startswith(tuple(prefixes[:-1])) and n not in copied]
    problems += [f"{name} is in this model but not in the source" for name in missing]
    if problems:
        raise UserError(
            "transfer.source does not fit this model (use the same act and norm as the source):\n  - "
            + "\n  - ".join(problems)
        )
    return copied


def reuse(model: nn.Module, state: dict[str, torch.Tensor], layers: list[int], source: str) -> list[str]:
    """Copy the source's weights for the reused layers into `model`; returns the parameter names copied."""
    copied = check_fits(state, layers, {n: t.shape for n, t in model.state_dict().items()})
    model.load_state_dict(copied, strict=False)
    params = {n for n, _ in model.named_parameters()}
    log.info("transfer: reused hidden layers %s from %s", ", ".join(map(str, layers)) or "none", source)
    return [n for n in copied if n in params]


def frozen_norms(model: Network, layers: list[int], reused: list[str]) -> list[nn.Module]:
    """Batch-norm layers of the reused blocks or stages (and the input norm, if it was reused): kept in
    evaluation mode while frozen, so their running statistics stay the source's."""
    stages = model.stages()
    blocks = [stages[i - 1][1] for i in layers]
    if any(name.startswith("input_norm.") for name in reused):
        blocks.append(model.input_norm)
    return [m for b in blocks for m in b.modules() if is_batch_norm(m)]


def set_frozen(model: nn.Module, names: list[str], frozen: bool) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(not frozen)


def is_frozen(cfg: TransferConfig, epochs_done: int) -> bool:
    """Frozen for the first `unfreeze_after` epochs (for ever when that is null)."""
    return cfg.freeze and (cfg.unfreeze_after is None or epochs_done < cfg.unfreeze_after)


@dataclasses.dataclass
class Reuse:
    """What a run reused from transfer.source or model.weights (kept in its checkpoint: a resumed
    run does not read the source again)."""

    reused_layers: list = dataclasses.field(default_factory=list)  # the source's hidden layers kept (1-based)
    reused: list = dataclasses.field(default_factory=list)  # the parameter names copied from the source
    unfrozen: bool = False  # the reused layers were unfrozen


class Unfreezing(Callback):
    """Reused layers frozen (transfer.freeze) for the first transfer.unfreeze_after epochs, their
    batch norms kept in evaluation mode; then trained again, at their learning rate times
    transfer.unfreeze_lr_factor."""

    name = "unfreezing"

    def __init__(self, cfg: TransferConfig, reuse: Reuse):
        self.cfg, self.reuse = cfg, reuse
        self.frozen = False
        self.norms: list[nn.Module] = []

    def train_start(self, loop: Loop) -> None:
        """Freeze what the run reused, unless a resumed run had unfrozen it."""
        model, r = loop.engine.module, self.reuse
        self.frozen = bool(r.reused) and self.cfg.freeze and not r.unfrozen
        if self.frozen:
            set_frozen(model, r.reused, True)
            self.norms = frozen_norms(model, r.reused_layers, r.reused)

    def epoch_start(self, loop: Loop, epoch: int) -> None:
        """Unfreeze when this epoch is the first to train the reused layers; frozen batch norms stay
        in evaluation mode (their running statistics stay the source's)."""
        if self.frozen and not is_frozen(self.cfg, epoch - 1):
            set_frozen(loop.engine.module, self.reuse.reused, False)
            self.frozen, self.norms, self.reuse.unfrozen = False, [], True
            loop.engine.schedule.scale_reused(self.cfg.unfreeze_lr_factor)  # saved with the schedule's state
            loop.engine.refresh()  # under torchrun, DDP must now average their gradients too
            log.info(
                "transfer: reused layers unfrozen for epoch %d, their learning rate x %g",
                epoch,
                self.cfg.unfreeze_lr_factor,
            )
        for module in self.norms:
            module.eval()

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.reuse)

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        checkpoint.check_entry(path, f"callbacks.{self.name}", state, checkpoint.entries(Reuse))
        self.reuse = Reuse(**state)


def summary(run: RunConfig, layers: list[int], widths: list[int]) -> dict[str, Any]:
    cfg, own = run.transfer, MODELS[run.model.name].weights
    source = own.named(run.model) if own is not None else cfg.source
    return {
        "source": source,
        "reused_layers": layers,
        "replaced": cfg.replace,
        "widths": widths,
        "freeze": cfg.freeze,
        "unfreeze_after": cfg.unfreeze_after,
        "unfreeze_lr_factor": cfg.unfreeze_lr_factor,
    }
