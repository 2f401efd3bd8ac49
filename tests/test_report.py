"""dnnrun-report on hand-made run directories: numeric and categorical parameters, readable tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from dnnrun.insight import report
from dnnrun.store.rundir import RunDir

LRS = [10 ** (-4 + 3 * i / 5) for i in range(6)]  # 1e-4 ... 1e-1, log-spaced: 0.00039810717055349735, ...


def _run(path: Path, overrides: dict[str, str], val_loss: float, test_acc: float, epochs: int = 2) -> None:
    """A finished run as a report reads it: overrides, metrics.jsonl, summary.json, status.json."""
    run = RunDir(path)
    run.snapshot_dir.mkdir(parents=True)
    run.snapshot("overrides").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    for epoch in range(1, epochs + 1):
        run.append_metrics({"epoch": epoch, "val/loss": val_loss * (epochs + 1 - epoch), "val/acc": 1 - val_loss})
    run.write_summary(
        {
            "best": {"monitor": "val/loss", "epoch": epochs, "val/loss": val_loss, "val/acc": 1 - val_loss},
            "test": {"test/loss": val_loss + 0.01, "test/acc": test_acc},
            "wall_time_s": 1.5,
        }
    )
    run.write_status("completed", 0, {"overrides": [f"{k}={v}" for k, v in overrides.items()]})


@pytest.fixture
def lr_sweep(tmp_path: Path) -> Path:
    """6 jobs, optimizer.lr log-spaced over 3 decades (full float reprs, as Optuna writes them), act relu or elu."""
    sweep = tmp_path / "sweep"
    for i, lr in enumerate(LRS):
        act = ("relu", "elu")[i % 2]
        _run(
            sweep / f"{i}_optimizer.lr={lr!r},act={act}",
            {"optimizer.lr": repr(lr), "act": act},
            val_loss=0.3 + 0.05 * abs(i - 3),
            test_acc=0.9 - 0.013 * i,
        )
    return sweep


def _ranked(paths: list[Path]):
    runs = report.collect(paths)
    settings = [k for k in report.swept_keys(runs) if k not in report.REPEATS]
    return runs, settings, report.rank(report.group(runs, settings), "val/loss")


def test_a_log_spaced_parameter_is_plotted_on_a_log_axis_and_a_name_as_categories(lr_sweep: Path):
    runs, settings, _ = _ranked([lr_sweep])
    assert settings == ["optimizer.lr", "act"]
    from dnnrun.insight.plots import plt

    fig = report.param_figure(runs, "optimizer.lr", "val/loss")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    xs = sorted(float(x) for c in ax.collections for x, _ in c.get_offsets())
    assert xs == pytest.approx(LRS)  # each run at its value, not at a category's index
    assert not {t.get_text() for t in ax.get_xticklabels()} & {repr(lr) for lr in LRS}  # no 17-digit categories
    plt.close(fig)

    fig = report.param_figure(runs, "act", "val/loss")
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["elu", "relu"]
    plt.close(fig)


def test_a_parameter_spanning_less_than_two_decades_gets_a_linear_numeric_axis(tmp_path: Path):
    for i, rate in enumerate(("0.1", "0.25", "0.5")):
        _run(tmp_path / str(i), {"regularizer.dropout.rate": rate}, val_loss=0.3 + i / 10, test_acc=0.8)
    runs = report.collect([tmp_path / str(i) for i in range(3)])
    from dnnrun.insight.plots import plt

    fig = report.param_figure(runs, "regularizer.dropout.rate", "val/loss")
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear"
    assert sorted(float(x) for c in ax.collections for x, _ in c.get_offsets()) == [0.1, 0.25, 0.5]
    plt.close(fig)


def test_values_are_shown_with_three_significant_digits_more_only_where_they_would_read_the_same():
    assert report.value_labels([repr(x) for x in LRS[:2]]) == {"0.0001": "0.0001", "0.00039810717055349735": "0.000398"}
    assert report.value_labels(["0.1", "1e-05", "3.1622776601683795e-05"]) == {
        "0.1": "0.1",
        "1e-05": "1e-05",
        "3.1622776601683795e-05": "3.16e-05",
    }
    assert report.value_labels(["0.10001", "0.10002"]) == {"0.10001": "0.10001", "0.10002": "0.10002"}
    assert report.value_labels(["1024", "64", "relu", "true"]) == {
        "1024": "1024",
        "64": "64",
        "relu": "relu",
        "true": "true",
    }


@pytest.mark.parametrize("width", [80, 120])
def test_the_terminal_table_shows_every_header_whole_and_values_compact(lr_sweep: Path, width: int):
    _, settings, groups = _ranked([lr_sweep])
    console = Console(width=width, file=io.StringIO(), force_terminal=False)
    console.print(report.table(groups, settings, "val/loss", console.width))
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    for header in ("optimizer.lr", "act", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert header in text, text
    assert "…" not in text
    assert "0.000398" in text and "0.00039810717055349735" not in text
    assert "same in every row: runs=1, status=completed" in text  # columns with one value move to the caption


def test_long_parameter_names_that_do_not_fit_are_shortened_and_named_in_a_legend(tmp_path: Path):
    names = ("regularizer.dropout.rate", "optimizer.momentum", "init.gain")
    paths = []
    for i in range(4):
        paths.append(tmp_path / str(i))
        _run(paths[-1], {k: f"0.{i}{j}" for j, k in enumerate(names)}, val_loss=0.3 + i / 10, test_acc=0.8 - i / 10)
    _, settings, groups = _ranked(paths)
    for width, shortened in ((80, True), (200, False)):
        console = Console(width=width, file=io.StringIO(), force_terminal=False)
        console.print(report.table(groups, settings, "val/loss", console.width))
        text = console.file.getvalue()
        assert "…" not in text, text
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width, text
        for name in names:
            assert name in text, text
        assert ("rate = regularizer.dropout.rate" in text) == shortened, text


def test_report_md_shows_compact_values_and_report_csv_the_exact_ones(lr_sweep: Path):
    assert report.main([str(lr_sweep)]) == 0
    markdown = (lr_sweep / "report.md").read_text()
    assert "| 0.000398 |" in markdown and "0.00039810717055349735" not in markdown
    assert "0.00039810717055349735" in (lr_sweep / "report.csv").read_text()
    for name in ("learning_curves.png", "param_optimizer.lr.png", "param_act.png"):
        assert (lr_sweep / name).stat().st_size > 0, name


def test_a_k_fold_sweep_is_reported_as_mean_and_std_over_the_folds(tmp_path: Path):
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "data.folds=3",
        "data.fold=range(3)",
        "act=relu,elu",
        "trainer.epochs=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert sorted(r["act"] for r in rows) == ["elu", "relu"] and all(r["runs"] == "3" for r in rows)
    assert all(float(r["val/acc std"]) >= 0 for r in rows) and "data.fold" not in rows[0]


@pytest.mark.parametrize(
    "name, what", [("missing", "does not exist"), ("empty", "is neither a run directory nor a sweep")]
)
def test_a_path_that_holds_no_run_is_bad_input(name, what, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / name)]) == 2
    assert f"error: {tmp_path / name} {what}" in capsys.readouterr().err
