"""Pretraining the hidden layers before supervised training, on the training inputs alone.

- `autoencoder`: greedy layer-wise stacked autoencoder. Layer i learns to reconstruct its input
  (the output of the already pretrained layers below, which stay fixed) through a temporary
  linear decoder.
- `rbm`: each sigmoid layer is a restricted Boltzmann machine trained with contrastive divergence
  (CD-k), layer by layer; its weights and hidden biases become the layer's.
- `corrupted`: self-supervised: a temporary head on top of all hidden layers learns to tell the
  real inputs from corrupted ones (a fraction of each corrupted example's features swapped in from
  another example), the image analogue of telling good sentences from bad.
- `rotation`: self-supervised, for square images: predict by how many quarter turns an image was
  rotated.

Supervised fine-tuning then starts from these weights (with a fresh output layer); `data.max_train`
keeps only a few labels while pretraining still sees every training input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dnnrun.config.schema import FRACTION, POSITIVE, Choice, Problems, check_rules, parse_choice
from dnnrun.errors import UserError

if TYPE_CHECKING:
    import torch

    from dnnrun.models.network import Network

# torch is imported in the functions that pretrain, not here: checking a config must not wait for it.
log = logging.getLogger("dnnrun")
MONITOR_SIZE = 1024  # examples on which the reconstruction error or auxiliary accuracy is reported


def _dense_blocks(model: Network, method: str):
    """The hidden blocks, each with a Linear layer: what layer-wise pretraining builds its decoders on."""
    from torch import nn

    hidden = model.hidden()
    for name, block in hidden:
        if not isinstance(block.affine, nn.Linear):
            raise UserError(
                f"pretrain={method} pretrains dense layers one by one, so model=mlp only; {name} is a "
                f"{type(block.affine).__name__} (for conv nets: pretrain=rotation or pretrain=corrupted)"
            )
    return hidden


def _fit(
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> None:
    """One epoch of mini-batch steps; loss_of(indices) is the loss of those examples."""
    import torch

    order = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n, batch_size):
        loss = loss_of(order[start : start + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# Unsupervised, layer by layer


def none(model: Network, x: torch.Tensor, shape: tuple[int, ...] | None, generator: torch.Generator) -> dict:
    return {}


def autoencoder(
    model: Network,
    x: torch.Tensor,
    shape: tuple[int, ...] | None,
    generator: torch.Generator,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    report = []
    monitor = x[:MONITOR_SIZE]
    for name, block in _dense_blocks(model, "autoencoder"):
        below = model.below(name).eval()
        with torch.no_grad():
            inputs = below(x)  # fixed: the layers below are already pretrained
            target = below(monitor)
        decoder = nn.Linear(block.affine.out_features, block.affine.in_features).to(x.device)
        optimizer = torch.optim.Adam([*block.parameters(), *decoder.parameters()], lr=lr)

        def error() -> float:
            block.eval()
            with torch.no_grad():
                return F.mse_loss(decoder(block(target)), target).item()

        before = error()
        for _ in range(epochs):
            block.train()
            _fit(
                optimizer,
                lambda idx: F.mse_loss(decoder(block(inputs[idx])), inputs[idx]),
                len(inputs),
                batch_size,
                generator,
                x.device,
            )
        report.append({"layer": name, "reconstruction_before": before, "reconstruction_after": error()})
        log.info(
            "pretrain autoencoder %s: reconstruction error %.4f -> %.4f",
            name,
            before,
            report[-1]["reconstruction_after"],
        )
    return {"layers": report}


def rbm(
    model: Network,
    x: torch.Tensor,
    shape: tuple[int, ...] | None,
    generator: torch.Generator,
    epochs: int = 5,
    lr: float = 0.01,
    k: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Bernoulli hidden units; visible units are Bernoulli where the layer's input lies in [0, 1]
    (sigmoid outputs, inputs scaled to [0, 1]) and unit-variance Gaussian otherwise (standardized inputs)."""
    import torch
    import torch.nn.functional as F

    report = []
    monitor = x[:MONITOR_SIZE]
    for name, block in _dense_blocks(model, "rbm"):
        below = model.below(name).eval()
        with torch.no_grad():
            v_all = below(x)
            v_monitor = below(monitor)
        W, b_h = block.affine.weight, block.affine.bias  # (hidden, visible), (hidden,)
        b_v = torch.zeros(W.shape[1], device=x.device)
        gaussian = bool(v_all.min() < 0 or v_all.max() > 1)

        def visible_mean(h: torch.Tensor) -> torch.Tensor:
            a = h @ W + b_v
            return a if gaussian else torch.sigmoid(a)

        def error() -> float:
            with torch.no_grad():
                return F.mse_loss(visible_mean(torch.sigmoid(v_monitor @ W.T + b_h)), v_monitor).item()

        before = error()
        with torch.no_grad():
            for _ in range(epochs):
                order = torch.randperm(len(v_all), generator=generator).to(x.device)
                for start in range(0, len(v_all), batch_size):
                    v0 = v_all[order[start : start + batch_size]]
                    p_h0 = torch.sigmoid(v0 @ W.T + b_h)
                    h, v, p_h = torch.bernoulli(p_h0), v0, p_h0
                    for _ in range(k):  # k steps of Gibbs sampling: CD-k
                        v = visible_mean(h)  # mean-field visible units, as is usual for CD
                        p_h = torch.sigmoid(v @ W.T + b_h)
                        h = torch.bernoulli(p_h)
                    n = len(v0)
                    W += lr * (p_h0.T @ v0 - p_h.T @ v) / n
                    b_h += lr * (p_h0 - p_h).mean(0)
                    b_v += lr * (v0 - v).mean(0)
        report.append(
            {
                "layer": name,
                "visible": "gaussian" if gaussian else "bernoulli",
                "reconstruction_before": before,
                "reconstruction_after": error(),
            }
        )
        log.info("pretrain rbm %s: reconstruction error %.4f -> %.4f", name, before, report[-1]["reconstruction_after"])
    return {"layers": report}


# ---------------------------------------------------------------------------------------------
# Self-supervised auxiliary tasks: labels made from the inputs themselves


def corrupt(x: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About half of the examples get `fraction` of their features (pixels) replaced by another
    example's (label 1); the rest stay as they are (label 0). A corrupted example always differs from
    its original; one identical to every other example cannot be corrupted and keeps label 0."""
    import torch

    shape = x.shape
    x = x.reshape(len(x), -1)  # images: one row of pixels each
    n, d = x.shape
    device = x.device
    partner = (torch.arange(n) + torch.randint(1, max(n, 2), (n,), generator=generator)) % n
    donor = x[partner.to(device)]
    differs = donor != x
    mask = (torch.rand(n, d, generator=generator).to(device) < fraction) & differs
    rows = torch.arange(n, device=device)
    first = differs.float().argmax(1)  # where the draw picked nothing, one differing feature changes
    mask[rows, first] |= differs[rows, first] & ~mask.any(1)
    labels = (torch.rand(n, generator=generator) < 0.5).to(device) & differs.any(1)
    mask &= labels.unsqueeze(1)
    return torch.where(mask, donor, x).reshape(shape), labels.long()


def rotate(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (N, C, H, W) turned by 0, 1, 2 or 3 quarter turns (the label)."""
    import torch

    labels = torch.randint(0, 4, (len(x),), generator=generator).to(x.device)
    rotated = torch.empty_like(x)
    for quarter in range(4):
        chosen = labels == quarter
        rotated[chosen] = torch.rot90(x[chosen], quarter, dims=(2, 3))
    return rotated, labels


def _auxiliary(
    model: Network,
    x: torch.Tensor,
    make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    task: str,
) -> dict[str, Any]:
    """Train all hidden layers plus a temporary head on labels made by `make`, fresh each epoch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    stack = model.body()
    head = nn.Linear(model.head_width, classes).to(x.device)
    optimizer = torch.optim.Adam([*stack.parameters(), *head.parameters()], lr=lr)
    held_x, held_y = make(x[:MONITOR_SIZE])

    def accuracy() -> float:
        stack.eval()
        with torch.no_grad():
            return (head(stack(held_x)).argmax(1) == held_y).float().mean().item()

    before = accuracy()
    for _ in range(epochs):
        inputs, labels = make(x)
        stack.train()
        _fit(
            optimizer,
            lambda idx: F.cross_entropy(head(stack(inputs[idx])), labels[idx]),
            len(inputs),
            batch_size,
            generator,
            x.device,
        )
    after = accuracy()
    log.info("pretrain %s: auxiliary-task accuracy %.3f -> %.3f (chance %.3f)", task, before, after, 1 / classes)
    return {"task": task, "accuracy_before": before, "accuracy_after": after, "chance": 1 / classes}


def corrupted(
    model: Network,
    x: torch.Tensor,
    shape: tuple[int, ...] | None,
    generator: torch.Generator,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    fraction: float = 0.3,
) -> dict[str, Any]:
    return _auxiliary(
        model,
        x,
        lambda v: corrupt(v, fraction, generator),
        2,
        epochs,
        lr,
        batch_size,
        generator,
        "original vs corrupted",
    )


def rotation(
    model: Network,
    x: torch.Tensor,
    shape: tuple[int, ...] | None,
    generator: torch.Generator,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
) -> dict[str, Any]:
    if shape is None or shape[1] != shape[2]:
        raise UserError(f"pretrain=rotation needs square images; this data's examples have shape {shape}")
    return _auxiliary(model, x, lambda v: rotate(v, generator), 4, epochs, lr, batch_size, generator, "rotation")


PRETRAINERS = {
    "none": none,
    "autoencoder": autoencoder,
    "rbm": rbm,
    "corrupted": corrupted,
    "rotation": rotation,
}

RULES = {"epochs": POSITIVE, "lr": POSITIVE, "batch_size": POSITIVE, "k": POSITIVE, "fraction": FRACTION}


def parse(raw, key: str, problems: Problems) -> Choice | None:
    choice = parse_choice(raw, PRETRAINERS, key, "pretraining", problems)
    if choice is not None:
        check_rules(choice.params, RULES, key, problems)
    return choice


def run(choice: Choice, model: Network, x: torch.Tensor, shape: tuple[int, ...] | None, seed: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    report = PRETRAINERS[choice.name](model, x, shape, generator, **choice.params)
    return {"method": choice.name, **report} if report else {}
