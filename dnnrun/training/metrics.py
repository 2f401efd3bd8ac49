"""Metrics: which way each improves, the loss and accuracy of a split, and the scores of predicted
probabilities (accuracy, negative log-likelihood, calibration error, entropy).

torch is imported inside the functions that compute: reading and ranking runs does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dnnrun.data.datasets import Split


def maximized(metric: str) -> bool:
    """Accuracies improve upwards, losses downwards."""
    return metric.endswith("acc")


def better(metric: str, value: float, than: float, min_delta: float = 0.0) -> bool:
    """Whether `value` of `metric` improves on `than` by more than min_delta."""
    return value > than + min_delta if maximized(metric) else value < than - min_delta


def loss_and_accuracy(model: nn.Module, split: Split, batch_size: int, autocast) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole split, in evaluation mode."""
    model.eval()
    loss, acc = members_loss_and_accuracy(lambda xb: model(xb)[None], split, batch_size, autocast)
    return loss[0], acc[0]


def members_loss_and_accuracy(forward, split: Split, batch_size: int, autocast) -> tuple[list[float], list[float]]:
    """Each member's (mean cross-entropy, accuracy) over the whole split: `forward` maps a batch
    (B, ...) to the members' logits (K, B, classes), one model's as K = 1. Summed on the device,
    read once."""
    import torch
    import torch.nn.functional as F

    loss_sum = correct = None
    with torch.no_grad():
        for xb, yb in split.batches(batch_size):
            with autocast():
                logits = forward(xb)
            k = logits.shape[0]
            if k == 1:  # one model: as torch sums a batch's losses
                losses = F.cross_entropy(logits[0].float(), yb, reduction="sum")[None]
            else:
                losses = (
                    F.cross_entropy(logits.float().flatten(0, 1), yb.repeat(k), reduction="none").view(k, -1).sum(1)
                )
            hits = (logits.argmax(2) == yb).sum(1)
            loss_sum, correct = (losses, hits) if loss_sum is None else (loss_sum + losses, correct + hits)
    return (loss_sum / len(split)).tolist(), (correct / len(split)).tolist()


def scores(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, negative log-likelihood, expected calibration error (over `bins` equal-width
    confidence bins) and mean predictive entropy of class probabilities (N, C) against labels (N,)."""
    import torch

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
    return {
        "accuracy": correct.mean().item(),
        "nll": nll.mean().item(),
        "ece": ece.item(),
        "entropy": entropy.mean().item(),
    }
