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
    import torch
    import torch.nn.functional as F

    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.int64)
    with torch.no_grad():
        for xb, yb in split.batches(batch_size):
            with autocast():
                logits = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    return (loss_sum / len(split)).item(), (correct / len(split)).item()


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
