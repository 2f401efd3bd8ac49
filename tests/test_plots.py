"""The figures themselves: every axes labelled, the best epoch marked on the learning curves, and
matplotlib imported only when something is drawn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_config
from dnnrun.insight import plots
from dnnrun.store.rundir import RunDir
from dnnrun.training import loop


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plotting functions draw, kept for inspection (they are still saved)."""
    figures, save = [], plots._save

    def keep(fig, path: Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def unlabelled(fig) -> list[str]:
    """Each axes of the figure that lacks an x or a y label ('' when all have both). Axes turned
    off (a placeholder's text, the unused cells of a grid) have nothing to label; a colorbar needs
    the label of its long axis."""
    missing = []
    for ax in fig.axes:
        name = ax.get_title() or ax.get_label() or f"axes {fig.axes.index(ax)}"
        if not ax.axison:
            continue
        if ax.get_label() == "<colorbar>":
            if not (ax.get_xlabel() or ax.get_ylabel()):
                missing.append(f"{name}: colorbar")
            continue
        missing += [f"{name}: {axis}" for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())) if not label]
    return missing


def best_markers(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("best epoch")]


def test_every_plot_of_a_tiny_run_has_labelled_axes_and_marks_its_best_epoch(tmp_path: Path, drawn: list):
    run = RunDir(tmp_path / "run")
    summary = loop.run(make_config("trainer.epochs=3", "trainer.diagnostics.every=10", "act=tanh"), run.path)
    plots.plot_run(run)
    plots.activation_functions(tmp_path / "activation_functions.png")
    plots.lr_find_plot(
        {
            "lrs": [1e-4, 1e-3, 1e-2],
            "losses": [2.3, 1.9, 4.0],
            "smoothed": [2.3, 2.0, 3.0],
            "suggestion": 1e-3,
            "min_loss_lr": 1e-3,
        },
        tmp_path / "lr_find.png",
    )
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    assert len(drawn) == len(plots.RUN_PLOTS) + 2
    for fig in drawn:
        assert sum(ax.axison for ax in fig.axes) > 0  # something was drawn, not just a placeholder
        assert unlabelled(fig) == [], fig.axes[0].get_title()
    loss_ax, acc_ax = drawn[0].axes[:2]
    assert summary["best"]["epoch"] is not None
    assert best_markers(loss_ax) == best_markers(acc_ax) == [summary["best"]["epoch"]]


def _write_run(
    path: Path, val_loss: list[float], val_acc: list[float], summary: dict | None = None, monitor: str | None = None
) -> RunDir:
    run = RunDir(path)
    run.path.mkdir(parents=True)
    for epoch, (loss, acc) in enumerate(zip(val_loss, val_acc), 1):
        run.append_metrics(
            {
                "epoch": epoch,
                "step": 10 * epoch,
                "train/loss": 1 / epoch,
                "train/acc": 0.5,
                "val/loss": loss,
                "val/acc": acc,
                "lr": 0.01,
            }
        )
    if summary is not None:
        run.write_summary(summary)
    if monitor is not None:  # the config snapshot the CLI writes
        run.snapshot_dir.mkdir()
        run.snapshot("config").write_text(f"trainer:\n  monitor: {monitor}\n")
    return run


VAL_LOSS = [1.0, 0.5, 0.7, 0.6]  # lowest at epoch 2
VAL_ACC = [0.5, 0.6, 0.7, 0.65]  # highest at epoch 3


@pytest.mark.parametrize(
    ("summary", "monitor", "best"),
    [
        (None, None, (2, "val/loss")),  # a run still going, the default monitor
        (None, "val/acc", (3, "val/acc")),  # ... monitoring val/acc, as its config snapshot says
        ({"epochs_run": 4, "best": {"monitor": "val/loss", "epoch": 4}}, None, (4, "val/loss")),  # the summary decides
        ({"epochs_run": 2, "best": {"monitor": "val/acc", "epoch": 1}}, None, (3, "val/acc")),  # ... unless stale
    ],
)
def test_the_best_epoch_is_the_summarys_else_the_monitored_metrics_best(
    tmp_path: Path, drawn: list, summary, monitor, best
):
    run = _write_run(tmp_path / "run", VAL_LOSS, VAL_ACC, summary, monitor)
    history = run.read_metrics()
    assert plots.best_epoch(run, history) == best
    run.plots.mkdir()
    plots.learning_curves(history, run.plot("learning_curves"), plots.best_epoch(run, history))
    loss_ax, acc_ax = drawn[0].axes[:2]
    assert best_markers(loss_ax) == best_markers(acc_ax) == [best[0]]
    assert f"best epoch ({best[0]}, by {best[1]})" in [t.get_text() for t in loss_ax.get_legend().get_texts()]


def test_importing_the_plots_module_imports_neither_matplotlib_nor_torch():
    code = "import sys, dnnrun.insight.plots; print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_deep_net_s_layer_axis_names_at_most_max_layer_labels_layers(tmp_path: Path, drawn: list):
    """100 layers' names on one axis overlap: every k-th is named, the first and the output always."""
    layers = {f"hidden{i}": {"grad_norm": 1.0 / i, "saturated": 0.5} for i in range(1, 101)} | {
        "output": {"grad_norm": 1.0}
    }
    records = [{"step": s, "epoch": 1, "layers": layers} for s in (1, 100, 200)]
    plots.gradient_flow(records, tmp_path / "gradient_flow.png")
    plots.unit_health(records, tmp_path / "unit_health.png")
    for fig in drawn:
        names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert len(names) <= plots.MAX_LAYER_LABELS + 1
        assert names[0] == "hidden1" and names[-1] in ("output", "hidden100")
