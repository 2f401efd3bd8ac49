"""Plots of a run, drawn from the files in its directory (PNG, matplotlib's Agg backend).

dnnrun-plot RUN_DIR                    (re)draw RUN_DIR/plots/*.png
dnnrun-plot --activations [--out DIR]  every registered activation and its derivative
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

from dnnrun.errors import command
from dnnrun.store.rundir import RunDir
from dnnrun.training.metrics import maximized

SIZE = (10, 6)  # inches; at DPI this is 1000 x 600 pixels
DPI = 100
RUN_PLOTS = ("learning_curves", "gradient_flow", "activations", "unit_health")
MAX_PANELS = 24  # layers drawn in the activation-distribution plot (deeper nets: evenly spaced ones)
SMALL = 7  # font size of the labels in grids of small plots


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed, never an interactive window),
    imported when the first plot is drawn: importing this module costs nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):  # `from dnnrun.insight.plots import plt` (dnnrun-report's figures) imports it then
    if name == "plt":
        return _pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _save(fig, path: Path) -> Path:
    fig.set_size_inches(*SIZE)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _save_grid(fig, axes, used: int, title: str, path: Path) -> Path:
    """A grid of small plots: the unused cells hidden, one legend, a title."""
    for ax in list(axes.flat)[used:]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=SMALL)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _extent(steps: list[int], rows: int) -> tuple[float, float, float, float]:
    """Cells centred on their steps, rows top to bottom (a single record gets a cell of width 1)."""
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    return steps[0] - half, steps[-1] + half, rows - 0.5, -0.5


def learning_curves(history: list[dict], path: Path, best: tuple[int, str] | None = None) -> Path:
    """Loss and accuracy per epoch, training against validation, the learning rate on a second axis;
    best = (epoch, monitor) marks that epoch on both."""
    fig, (loss_ax, acc_ax) = _pyplot().subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    # train_eval (trainer.eval_train): the training subset in evaluation mode, comparable with val; the
    # running training figures (dropout on, the weights moving during the epoch) drawn faintly beside it
    measured = all("train_eval/loss" in r for r in history) and bool(history)
    curves = (
        [("train_eval", "-", "train (eval mode)", 1.0), ("train", "-", "train (running, dropout on)", 0.35)]
        if measured
        else [("train", "-", "train", 1.0)]
    )
    for split, style, name, alpha in [*curves, ("val", "--", "val", 1.0)]:
        loss_ax.plot(epochs, [r[f"{split}/loss"] for r in history], style, label=f"{name} loss", alpha=alpha)
        acc_ax.plot(epochs, [r[f"{split}/acc"] for r in history], style, label=f"{name} accuracy", alpha=alpha)
    if best is not None:
        epoch, monitor = best
        for ax in (loss_ax, acc_ax):
            ax.axvline(epoch, color="green", ls="-.", lw=1, label=f"best epoch ({epoch}, by {monitor})")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(epochs, [r["lr"] for r in history], ":", color="grey", label="learning rate")
    lr_ax.set(xlabel="epoch", ylabel="learning rate")  # its x axis is the loss plot's (hidden)
    if history and all(r["lr"] and r["lr"] > 0 for r in history):
        lr_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    handles = loss_ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles=handles, loc="upper right")
    acc_ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def best_epoch(run: RunDir, history: list[dict]) -> tuple[int, str] | None:
    """(epoch, monitor) of the run's best epoch: the one summary.json names, once it describes this
    history; else (a run still going, or the end of a run, drawn before its summary is written) the
    best trainer.monitor value in the history."""
    summary = run.read_summary() or {}
    best = summary.get("best") or {}
    monitor = best.get("monitor") or _monitor(run)
    if best.get("epoch") is not None and history and summary.get("epochs_run") == history[-1]["epoch"]:
        return best["epoch"], monitor
    scored = [r for r in history if r.get(monitor) is not None and math.isfinite(r[monitor])]
    if not scored:
        return None
    pick = max if maximized(monitor) else min
    return pick(scored, key=lambda r: r[monitor])["epoch"], monitor


def _monitor(run: RunDir) -> str:
    """trainer.monitor from the run's config snapshot (val/loss, the default, without one)."""
    import yaml

    path = run.snapshot("config")
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return ((config or {}).get("trainer") or {}).get("monitor") or "val/loss"


MAX_LAYER_LABELS = 25  # a 100-layer net's labels would overlap: every k-th layer is named, and the output


def _layer_ticks(ax, layers: list[str]) -> None:
    """One y tick per layer, at most MAX_LAYER_LABELS of them (the first, every k-th, the last)."""
    k = max(1, -(-len(layers) // MAX_LAYER_LABELS))
    shown = sorted({*range(0, len(layers), k), len(layers) - 1})
    ax.set_yticks(shown, [layers[i] for i in shown])


def gradient_flow(records: list[dict], path: Path) -> Path:
    from matplotlib.colors import LogNorm

    fig, ax = _pyplot().subplots()
    layers = list(records[0]["layers"]) if records else []
    values = [[r["layers"].get(layer, {}).get("grad_norm") or float("nan") for r in records] for layer in layers]
    positive = [v for row in values for v in row if v > 0 and math.isfinite(v)]
    if not positive:
        _placeholder(ax, "no gradient statistics recorded (trainer.diagnostics.every=0?)")
        return _save(fig, path)
    grid = [[v if v > 0 else float("nan") for v in row] for row in values]
    steps = [r["step"] for r in records]
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=min(positive), vmax=max(positive)),
        extent=_extent(steps, len(layers)),
    )
    _layer_ticks(ax, layers)
    ax.set(xlabel="step", ylabel="layer", title="gradient flow: L2 norm of each layer's weight gradient (log scale)")
    fig.colorbar(image, ax=ax, label="gradient norm")
    fig.tight_layout()
    return _save(fig, path)


def activations(snapshots: dict, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter

    plt = _pyplot()
    layers = list(snapshots.get("end") or snapshots.get("start") or {})
    shown = f"{MAX_PANELS} of the {len(layers)} layers, " if len(layers) > MAX_PANELS else ""
    if shown:  # very deep nets: evenly spaced layers, the first and the last included
        layers = [layers[round(i * (len(layers) - 1) / (MAX_PANELS - 1))] for i in range(MAX_PANELS)]
    if not layers:
        fig, ax = plt.subplots()
        _placeholder(ax, "no activation snapshots recorded")
        return _save(fig, path)
    cols = min(4 if len(layers) <= 8 else 6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for when, style in (("start", "--"), ("end", "-")):
            h = snapshots.get(when, {}).get(layer)
            if h:
                counts = h["counts"]
                width = (h["high"] - h["low"]) / len(counts)
                centres = [h["low"] + (i + 0.5) * width for i in range(len(counts))]
                total = sum(counts) or 1
                ax.plot(centres, [c / total for c in counts], style, label=when)
        ax.set_yscale("log")  # the spike of exact zeros (ReLU) would flatten everything else
        ax.yaxis.set_minor_formatter(NullFormatter())  # decades only: small panels have no room for more
        ax.set_title(layer, fontsize=9)
        size = SMALL if len(layers) <= 8 else SMALL - 1
        ax.set_xlabel("activation", fontsize=size)
        ax.set_ylabel("fraction", fontsize=size)
        ax.tick_params(labelsize=size)
    return _save_grid(
        fig,
        axes,
        len(layers),
        f"activation distributions per layer ({shown}fraction per bin, "
        "log scale), at the start and the end of training",
        path,
    )


def unit_health(records: list[dict], path: Path) -> Path:
    """Dead (ReLU) and saturated (sigmoid/tanh) fractions as layer x step maps, one per kind present."""
    layers = [layer for layer in (records[0]["layers"] if records else {}) if layer != "output"]
    kinds = [
        k for k in ("dead", "saturated") if any(k in r["layers"].get(layer, {}) for r in records for layer in layers)
    ]
    plt = _pyplot()
    if not kinds:
        fig, ax = plt.subplots()
        _placeholder(ax, "no dead or saturated units to track for this activation (only ReLU, sigmoid and tanh)")
        return _save(fig, path)
    fig, axes = plt.subplots(1, len(kinds), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, kind in zip(axes.flat, kinds):
        grid = [[r["layers"].get(layer, {}).get(kind, float("nan")) for r in records] for layer in layers]
        image = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            vmin=0,
            vmax=1,
            extent=_extent(steps, len(layers)),
        )
        _layer_ticks(ax, layers)
        ax.set(xlabel="step", ylabel="layer", title=f"fraction of {kind} units")
        fig.colorbar(image, ax=ax, label=f"{kind} fraction")
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run: RunDir | Path) -> list[Path]:
    """Draw every plot of a run into RUN_DIR/plots/ from its metrics, diagnostics and snapshots."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    run.plots.mkdir(exist_ok=True)
    records, history = run.read_diagnostics(), run.read_metrics()
    return [
        learning_curves(history, run.plot("learning_curves"), best_epoch(run, history)),
        gradient_flow(records, run.plot("gradient_flow")),
        activations(run.read_activations(), run.plot("activations")),
        unit_health(records, run.plot("unit_health")),
    ]


def activation_functions(path: Path) -> Path:
    """Every registered activation and its derivative over [-5, 5] (derivatives by autograd)."""
    import torch

    from dnnrun.config.schema import Choice
    from dnnrun.techniques.activations import ACTIVATIONS, build as build_activation

    names = sorted(ACTIVATIONS)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = _pyplot().subplots(rows, cols, squeeze=False, sharex=True)
    z = torch.linspace(-5, 5, 401, dtype=torch.float64, requires_grad=True)
    for ax, name in zip(axes.flat, names):
        module = build_activation(Choice(name), width=1).double().eval()
        out = module(z)
        (grad,) = torch.autograd.grad(out.sum(), z)
        ax.plot(z.detach(), out.detach(), label="f(z)")
        ax.plot(z.detach(), grad, "--", label="f'(z)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("z", fontsize=SMALL)
        ax.set_ylabel("f(z), f'(z)", fontsize=SMALL)
        ax.tick_params(labelsize=SMALL)
        asymptotes = ACTIVATIONS[name].asymptotes
        if asymptotes:  # where the output hugs an asymptote the derivative vanishes
            for a in asymptotes:
                ax.axhline(a, color="red", lw=0.5, ls=":")
    return _save_grid(
        fig, axes, len(names), "activation functions (solid) and their derivatives (dashed) on [-5, 5]", path
    )


def lr_find_plot(result: dict, path: Path) -> Path:
    fig, ax = _pyplot().subplots()
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    if result.get("suggestion"):
        ax.axvline(result["suggestion"], color="green", ls="--", label=f"suggestion {result['suggestion']:.1e}")
    if result.get("min_loss_lr"):
        ax.axvline(result["min_loss_lr"], color="red", ls=":", label=f"minimum {result['min_loss_lr']:.1e}")
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:  # keep the explosion from squashing the interesting part
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title="learning-rate range test")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnrun-plot", description="Draw a run's plots, or the activation functions.")
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run directory (with metrics.jsonl)")
    parser.add_argument("--activations", action="store_true", help="draw every activation and its derivative")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for --activations (default: outputs)")
    args = parser.parse_args(argv)
    if args.activations:
        args.out.mkdir(parents=True, exist_ok=True)
        print(activation_functions(args.out / "activation_functions.png"))
        return 0
    if args.run_dir is None:
        parser.error("give a run directory, or --activations")
    run = RunDir(args.run_dir)
    if not run.metrics.is_file():
        print(f"error: {run} is not a dnnrun run directory (no metrics.jsonl)", file=sys.stderr)
        return 2
    for path in plot_run(run):  # a damaged metrics.jsonl: a UserError, reported by @command
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
