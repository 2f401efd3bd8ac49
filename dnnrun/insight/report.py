"""dnnrun-report: compare runs side by side.

    dnnrun-report SWEEP_DIR                 a sweep's jobs
    dnnrun-report RUN_DIR RUN_DIR ...       any runs (finished, still going or failed)
    dnnrun-report ... --out DIR             where report.md, report.csv and the figures go

The swept values (the overrides that differ between runs) become columns; runs that differ only by
trainer.seed or data.fold (k-fold cross-validation) are grouped into mean +- std; groups are ranked by
their best validation metric. Tables show metrics to 4 decimals and swept values to 3 significant
digits (report.csv keeps them exact); param_NAME.png puts a numeric parameter on a numeric axis
(logarithmic over two decades or more), a named one in categories.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from dnnrun.errors import UserError, command
from dnnrun.insight.console import console
from dnnrun.store.rundir import ENDED_WELL, RunDir, SweepDir
from dnnrun.training.metrics import maximized

METRICS = ("val/loss", "val/acc", "test/loss", "test/acc", "epochs", "time_s")
REPEATS = ("trainer.seed", "data.fold")  # runs that differ only in these repeat one setting: grouped


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        jobs, run = SweepDir(path).jobs(), RunDir(path)
        if jobs and not run.metrics.exists():
            runs += [r for job in jobs for r in _with_members(job)]
        elif run.is_run():
            runs += _with_members(run)
        else:
            what = "does not exist" if not path.exists() else "is neither a run directory nor a sweep directory"
            raise UserError(f"{path} {what}")
    return runs


def _with_members(run: RunDir) -> list[dict[str, Any]]:
    """A run, or for trainer.seeds its members, each as the run with its trainer.seed (so that they
    group into mean and std over the seeds)."""
    read = run.read()
    seeds = (run.read_summary() or {}).get("seeds")
    if not seeds:
        return [read]
    overrides = {k: v for k, v in read["overrides"].items() if k != "trainer.seeds"}
    found = []
    for seed in seeds:
        member = RunDir(run.path / "members" / f"seed_{seed}")
        if member.is_run():
            found.append({**member.read(), "overrides": {**overrides, "trainer.seed": str(seed)}})
    return found or [read]


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The overrides whose values differ between the runs, in the order they first appear."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run["overrides"] if k not in keys]
    return [k for k in keys if len({run["overrides"].get(k) for run in runs}) > 1]


def group(runs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Runs with the same swept values except the seed and the fold form one group: metrics as
    mean and std."""
    settings = [k for k in keys if k not in REPEATS]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run["overrides"].get(k, "-") for k in settings), []).append(run)
    out = []
    for values, members in groups.items():
        row: dict[str, Any] = dict(zip(settings, values))
        row["runs"] = len(members)
        row["status"] = ", ".join(sorted({m["status"] for m in members}))
        row["members"] = members
        for metric in METRICS:
            numbers = [
                m[metric] for m in members if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])
            ]
            row[metric] = statistics.fmean(numbers) if numbers else None
            row[f"{metric} std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
        out.append(row)
    return out


def rank(groups: list[dict[str, Any]], monitor: str) -> list[dict[str, Any]]:
    """Best first by the monitored validation metric; groups without one last."""
    sign = -1 if maximized(monitor) else 1
    return sorted(groups, key=lambda g: (g[monitor] is None, sign * (g[monitor] or 0)))


def _fmt(row: dict[str, Any], metric: str) -> str:
    value, std = row.get(metric), row.get(f"{metric} std")
    if value is None:
        return "-"
    digits = 1 if metric in ("time_s", "epochs") else 4
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _columns(settings: list[str]) -> list[str]:
    return ["#", *settings, "runs", "status", *METRICS]


def _cells(place: int, row: dict[str, Any], settings: list[str], labels: dict[str, dict[str, str]]) -> list[str]:
    """One ranked group's row, as the terminal table and report.md show it."""
    return [
        str(place),
        *[labels[k].get(row[k], row[k]) for k in settings],
        str(row["runs"]),
        row["status"],
        *[_fmt(row, m) for m in METRICS],
    ]


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _numeric(values: list[str]) -> list[float] | None:
    """The values of a swept parameter as numbers, or None when it is categorical (act=relu,elu)."""
    numbers = [_number(v) for v in values]
    return None if any(x is None for x in numbers) else numbers


def value_labels(values: list[str]) -> dict[str, str]:
    """How a parameter's values are shown: floats to 3 significant digits (0.00031622776601683794 ->
    0.000316), more only where two values would otherwise read the same; integers and names as given."""
    floats = {v: x for v in values if (x := _number(v)) is not None and not v.lstrip("+-").isdigit()}
    for digits in range(3, 18):
        labels = {v: f"{x:.{digits}g}" for v, x in floats.items()}
        if len(set(labels.values())) == len(labels):
            break
    return {v: labels.get(v, v) for v in values}


def _labels(values: list[dict[str, str]], settings: list[str]) -> dict[str, dict[str, str]]:
    """value_labels of each parameter, from its values in rows or runs' overrides."""
    return {k: value_labels(sorted({v.get(k, "-") for v in values}, key=_natural)) for k in settings}


def _short_names(settings: list[str]) -> dict[str, str]:
    """optimizer.lr -> lr, where the last part names one parameter only."""
    last = [k.rsplit(".", 1)[-1] for k in settings]
    return {k: short if last.count(short) == 1 else k for k, short in zip(settings, last)}


def table(groups: list[dict[str, Any]], settings: list[str], monitor: str, width: int = 120) -> Table:
    """The ranked groups for a terminal `width` characters wide. Every header shows whole: columns
    that read the same in every row go into the caption, and where the swept parameters' full names
    still do not fit they are shortened (optimizer.lr -> lr) and named in full in a legend."""
    labels = _labels(groups, settings)
    header = _columns(settings)
    rows = [_cells(i, row, settings, labels) for i, row in enumerate(groups, start=1)]
    columns = list(zip(header, *rows)) if rows else [(h,) for h in header]
    same = [c for c in columns if len(rows) > 1 and c[0] not in ("#", monitor, *settings) and len(set(c[1:])) == 1]
    columns = [c for c in columns if c not in same]
    names = {k: k for k in settings}
    if _min_width(columns, names) > width:
        names = _short_names(settings)
    fits = _min_width(columns, names) <= width  # else Rich narrows the columns: headers fold, never cut
    caption = ["same in every row: " + ", ".join(f"{c[0]}={c[1]}" for c in same)] if same else []
    caption += [f"{short} = {k}" for k, short in names.items() if short != k]
    t = Table(
        title=f"ranked by best {monitor}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        caption="; ".join(caption) or None,
        caption_justify="left",
    )
    for name, *_ in columns:
        head = names.get(name, name)
        t.add_column(
            head,
            justify="left" if name in settings or name == "status" else "right",
            min_width=len(head) if fits else None,
            overflow="fold",
        )
    for i in range(len(rows)):
        t.add_row(*[c[1 + i] for c in columns])
    return t


def _min_width(columns: list[tuple[str, ...]], names: dict[str, str]) -> int:
    """The narrowest the table can be without cutting a header or a word: each column as wide as its
    header and its longest word, 3 characters between columns (padding and rule)."""
    cells = [(names.get(c[0], c[0]), *c[1:]) for c in columns]
    return sum(max(len(w) for cell in c for w in cell.split()) for c in cells) + 3 * (len(cells) - 1)


def write_markdown(
    groups: list[dict[str, Any]], settings: list[str], monitor: str, path: Path, figures: list[Path]
) -> None:
    header = _columns(settings)
    labels = _labels(groups, settings)
    lines = [
        "# dnnrun report",
        "",
        f"Ranked by the best {monitor} of each run (mean ± std over seeds and folds).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for i, row in enumerate(groups, start=1):
        lines.append("| " + " | ".join(_cells(i, row, settings, labels)) + " |")
    failures = [m for row in groups for m in row["members"] if m["status"] not in (*ENDED_WELL, "running")]
    if failures:
        lines += ["", "## Runs that did not complete", ""]
        lines += [f"- `{m['name']}`: {m['status']}" + (f": {m['error']}" if m.get("error") else "") for m in failures]
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    path.write_text("\n".join(lines) + "\n")


def write_csv(groups: list[dict[str, Any]], settings: list[str], path: Path) -> None:
    columns = [*settings, "runs", "status"] + [c for m in METRICS for c in (m, f"{m} std")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(groups)


def figures(runs: list[dict[str, Any]], settings: list[str], monitor: str, out: Path) -> list[Path]:
    from dnnrun.insight.plots import DPI, SIZE, plt  # the plots module sets the non-interactive backend

    written = []
    labels = _labels([run["overrides"] for run in runs], settings)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=SIZE)
    for run in runs:
        values = {k: run["overrides"].get(k, "-") for k in settings}
        label = " ".join(f"{k}={labels[k][v]}" for k, v in values.items()) or run["name"]
        epochs = [r["epoch"] for r in run["history"]]
        loss_ax.plot(epochs, [r["val/loss"] for r in run["history"]], label=label)
        acc_ax.plot(epochs, [r["val/acc"] for r in run["history"]], label=label)
    loss_ax.set(xlabel="epoch", ylabel="validation loss", title="validation loss")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    if len(runs) <= 12:
        acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=DPI)
    plt.close(fig)
    written.append(out / "learning_curves.png")
    for key in settings:
        fig = param_figure(runs, key, monitor)
        path = out / f"param_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written


LOG_SPAN = 100  # a numeric parameter whose positive values span this factor or more gets a log axis


def param_figure(runs: list[dict[str, Any]], key: str, monitor: str):
    """The best `monitor` of each run against its value of `key` (a matplotlib Figure, not saved).
    Numbers (optimizer.lr=0.00031622776601683794) go on a numeric axis, logarithmic where they span
    two decades or more; names (act=relu) are categories, one tick each, in natural order."""
    from dnnrun.insight.plots import SIZE, plt

    values = sorted({run["overrides"].get(key, "-") for run in runs}, key=_natural)
    numbers = _numeric(values)
    xs = numbers or list(range(len(values)))
    fig, ax = plt.subplots(figsize=SIZE)
    means = []
    for x, value in zip(xs, values):
        ys = [r[monitor] for r in runs if r["overrides"].get(key, "-") == value and r[monitor] is not None]
        ax.scatter([x] * len(ys), ys, alpha=0.6)
        means.append((x, statistics.fmean(ys)) if ys else None)
    if numbers is None:
        for x, mean in filter(None, means):
            ax.plot([x - 0.2, x + 0.2], [mean] * 2, color="black")
        ax.set_xticks(range(len(values)), [value_labels(values)[v] for v in values])
        marks = "dots: runs, bars: means"
    else:
        points = [m for m in means if m]
        if points:
            ax.plot(*zip(*points), color="black", linewidth=1)
        if min(numbers) > 0 and max(numbers) / min(numbers) >= LOG_SPAN:
            ax.set_xscale("log")
        marks = "dots: runs, line: means"
    ax.set(xlabel=key, ylabel=f"best {monitor}", title=f"best {monitor} by {key} ({marks})")
    fig.tight_layout()
    return fig


def _natural(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnrun-report", description="Compare dnnrun runs side by side.")
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories or run directories")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report goes (default: the sweep directory, or outputs/report for several paths)",
    )
    args = parser.parse_args(argv)
    runs = collect(args.paths)
    if not runs:
        print("error: no runs found in " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return 2
    one_sweep = len(args.paths) == 1 and not RunDir(args.paths[0]).is_run()
    out = args.out or (args.paths[0] if one_sweep else Path("outputs/report"))
    out.mkdir(parents=True, exist_ok=True)
    monitors = {run["monitor"] for run in runs}
    monitor = monitors.pop() if len(monitors) == 1 else "val/acc"
    keys = swept_keys(runs)
    settings = [k for k in keys if k not in REPEATS]
    groups = rank(group(runs, keys), monitor)
    drawn = figures(runs, settings, monitor, out)
    write_markdown(groups, settings, monitor, out / "report.md", drawn)
    write_csv(groups, settings, out / "report.csv")
    console.print(table(groups, settings, monitor, console.width))
    print(f"report: {out / 'report.md'}, {out / 'report.csv'}, {len(drawn)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
