"""What pruning saves in an Optuna search: `dnnrun -m experiment=search` on digits (its default 20
epochs a trial), 20 trials, with `hydra.sweeper.pruner=median` against `pruner=none`.

Both searches draw the same trials (a random sampler with a fixed seed: TPE would learn from the
pruned trials and draw others), so they differ only in the trials the pruner stopped. Printed: each
search's wall time (the installed command, start-up included), the trials pruned, the epochs
trained, the time ratio, and whether the best trial is the same. The two searches alternate and the
best time of `--repeats` is kept for each. Never run it beside another heavy job.

    python bench/pruning.py [--trials 20] [--repeats 1] [--data digits]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DNNRUN = str(Path(sys.executable).with_name("dnnrun"))


def search(pruner: str, trials: int, data: str, root: Path) -> tuple[float, dict, int]:
    """(seconds, optimization_results.yaml, epochs trained over all trials) of one search."""
    sweep = root / pruner
    command = [
        DNNRUN,
        "-m",
        "experiment=search",
        f"data={data}",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweep.dir={sweep}",
        f"outputs={root}",
        "trainer.progress=false",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    epochs = sum(len(p.read_text().splitlines()) for p in sweep.glob("*/metrics.jsonl"))
    return seconds, results, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", default="digits")
    args = parser.parse_args()
    best: dict[str, tuple[float, dict, int]] = {}
    for _ in range(args.repeats):
        for pruner in ("none", "median"):
            with tempfile.TemporaryDirectory() as tmp:
                found = search(pruner, args.trials, args.data, Path(tmp))
            if pruner not in best or found[0] < best[pruner][0]:
                best[pruner] = found
    for pruner, (seconds, results, epochs) in best.items():
        trials = results["trials"]
        print(
            f"pruner={pruner:6}  {seconds:6.1f} s  trials {json.dumps(trials)}  epochs trained {epochs}  "
            f"best trial {results['best_trial']} ({results['best_value']:.4f})"
        )
    (full, full_results, full_epochs), (pruned, pruned_results, pruned_epochs) = best["none"], best["median"]
    same = (full_results["best_trial"], full_results["best_params"]) == (
        pruned_results["best_trial"],
        pruned_results["best_params"],
    )
    print(
        f"median pruning: {pruned_results['trials'].get('pruned', 0)} of {args.trials} trials pruned, "
        f"{pruned_epochs} of {full_epochs} epochs trained, time {pruned / full:.2f}x of the unpruned search "
        f"({full - pruned:.1f} s saved); best trial the same: {same}"
    )


if __name__ == "__main__":
    main()
