"""The chapter's experiments, each run as its preset (`dnnrun experiment=chapter/NAME`), with the
book's figure beside dnnrun's: the table of docs/chapter.md.

Every run goes to ROOT/chapter/NAME (a finished one is read, not run again) and the figure is the
one the book gives: the validation accuracy at the last epoch, or the test accuracy where the book
reports that (transfer, alpha dropout, MC dropout). Task B is run over several seeds (the book's
author calls his gain cherry-picked): its row gives the mean, the spread and every seed's figure.
Needs Fashion-MNIST under the data root (DNNRUN_DATA); `../shared/data/fashion_mnist.sh ROOT` builds
one whose test split is not the official one. Printed: a Markdown table, and each run's wall time.

    DNNRUN_DATA=ROOT python bench/chapter.py [--outputs outputs] [--only leaky_relu,prelu] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DNNRUN = str(Path(sys.executable).with_name("dnnrun"))

# (preset, the claim, the book's figure, which figure: val (last epoch) | test | mc)
ROWS = [
    ("leaky_relu", "leaky ReLU (alpha 0.2), He init", 0.8396, "val"),
    ("prelu", "PReLU, He init", 0.8398, "val"),
    ("selu_100_layers", "100 SELU layers, LeCun init, standardized inputs: it trains", 0.8218, "val"),
    ("relu_100_layers", "the same 100 layers with ReLU, He init: vanishing/exploding gradients", 0.7380, "val"),
    ("batchnorm_after", "batch norm on the inputs and after each activation", 0.8750, "val"),
    ("batchnorm_before", "batch norm before each activation, no biases", 0.8660, "val"),
    ("transfer_b", "task B (sandal vs shirt, 200 images) from scratch", 0.9705, "test"),
    ("transfer_b_reuse", "task B reusing task A's hidden layers", 0.9940, "test"),
    ("optimizer_sgd", "SGD 1e-3", 0.8672, "val"),
    ("optimizer_nesterov", "Nesterov, momentum 0.9", 0.8708, "val"),
    ("optimizer_adagrad", "AdaGrad", 0.8424, "val"),
    ("optimizer_rmsprop", "RMSProp", 0.8636, "val"),
    ("optimizer_adam", "Adam", 0.8696, "val"),
    ("optimizer_adamax", "Adamax", 0.8780, "val"),
    ("optimizer_nadam", "Nadam", 0.8740, "val"),
    ("optimizer_adamw", "AdamW, weight decay 1e-5", 0.8702, "val"),
    ("schedule_power", "power scheduling", 0.8924, "val"),
    ("schedule_exponential", "exponential scheduling, Nadam", 0.8928, "val"),
    ("schedule_performance", "performance scheduling", 0.8936, "val"),
    ("schedule_onecycle", "1cycle, batch 128, up to 0.05", 0.8934, "val"),
    ("alpha_dropout", "alpha dropout 0.2, SELU", 0.8639, "test"),
    ("alpha_dropout", "MC dropout, 100 samples", 0.8661, "mc"),
    ("dropout", "dropout 0.2, ELU, Nadam, 2 epochs", 0.8722, "val"),
    ("l2", "l2 0.01, ELU, Nadam, 2 epochs", 0.8376, "val"),
    ("max_norm", "max-norm 1.0, 100-100 ReLU", 0.8578, "val"),
    ("sigmoid_normal", "deep sigmoid net from N(0, 1): fails to train", None, "val"),
]
SEEDED = {"transfer_b", "transfer_b_reuse"}


def dnnrun(root: Path, run: str, *overrides: str) -> tuple[Path, float]:
    """Runs `dnnrun OVERRIDES` into ROOT/chapter/RUN unless it finished there before: (its directory, seconds)."""
    where = root / "chapter" / run
    status = where / "status.json"
    if status.exists() and json.loads(status.read_text()).get("status") == "completed":
        return where, 0.0
    command = [DNNRUN, *overrides, f"outputs={root}", f"hydra.run.dir={where}", "trainer.progress=false"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    print(f"  {run}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return where, seconds


def figure(where: Path, which: str) -> float:
    if which == "val":
        last = (where / "metrics.jsonl").read_text().splitlines()[-1]
        return json.loads(last)["val/acc"]
    if which == "test":
        return json.loads((where / "summary.json").read_text())["test"]["test/acc"]
    return json.loads((where / "evaluation.json").read_text())["mc_dropout"]["accuracy"]


def measure(name: str, which: str, root: Path, seeds: int) -> list[float]:
    """dnnrun's figures for one row: one, or one per seed for task B."""
    if which == "mc":
        trained, _ = dnnrun(root, name, f"experiment=chapter/{name}")
        checkpoint = trained / "checkpoints" / "last.pt"
        where, _ = dnnrun(
            root, f"{name}_mc", "mode=evaluate", f"evaluate.checkpoint={checkpoint}", "evaluate.mc_samples=100"
        )
        return [figure(where, which)]
    if name not in SEEDED:
        return [figure(dnnrun(root, name, f"experiment=chapter/{name}")[0], which)]
    source, _ = dnnrun(root, "transfer_a", "experiment=chapter/transfer_a")
    reuse = [f"transfer.source={source / 'checkpoints' / 'last.pt'}"] if name == "transfer_b_reuse" else []
    return [
        figure(dnnrun(root, f"{name}_seed{s}", f"experiment=chapter/{name}", f"trainer.seed={s}", *reuse)[0], which)
        for s in range(seeds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--only", default="", help="comma-separated presets (default: every row)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for task B's two rows")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    root = args.outputs.resolve()
    print("| experiment | claim | book | dnnrun |\n|---|---|---|---|")
    for name, claim, book, which in ROWS:
        if only and name not in only:
            continue
        got = measure(name, which, root, args.seeds)
        shown = f"{got[0]:.4f}"
        if len(got) > 1:
            each = ", ".join(f"{g:.4f}" for g in got)
            shown = f"{statistics.mean(got):.4f} ± {statistics.stdev(got):.4f} ({each})"
        print(
            f"| `chapter/{name}` ({which}) | {claim} | {'' if book is None else f'{book:.4f}'} | {shown} |", flush=True
        )


if __name__ == "__main__":
    main()
