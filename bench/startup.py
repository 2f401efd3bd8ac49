"""Start-up cost of the installed `dnnrun`, against baselines measured on the same machine in the same run.

(a) A typo (`dnnrun optimizer=adamm`, exit 2) against `python -c "import hydra"`: the command line is
    checked without torch, so a typo should answer in about the time Hydra needs. Target: <= 1.5x.
    Also printed, for reference: a typo in a key (`trainer.epochz=3`), and Hydra composing
    dnnrun's config through its public compose API.
(b) The default `dnnrun` (digits, 20 epochs, plots on) against a floor: `python -c "import torch;
    torch.optim.SGD(...)"` (what any PyTorch training script pays to start) plus dnnrun's own
    training time, the sum of the epochs' `time/epoch_s` in its metrics.jsonl. Target: <= 1.5x.
(c) A basic-launcher multirun of 10 jobs (`dnnrun -m trainer.seed=0,...,9`, the default run each)
    against one of 1 job: what each job after the first adds beyond its own training time.
    Target: <= 150 ms a job. Also printed: the same for a Hydra app that does nothing with dnnrun's
    config, what Hydra's basic sweeper and launcher cost by themselves (they compose each job's
    config twice).

Each command runs in a fresh directory; baseline and dnnrun runs alternate and the best of
`--repeats` is kept for each, so background noise hits all alike. Never run it beside another
heavy job (two PyTorch processes on two cores slow each other several times over).

    python bench/startup.py [--repeats 5] [--sweep-repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DNNRUN = [str(Path(sys.executable).with_name("dnnrun"))]  # the installed console script, as users run it
FLOOR = "import torch; torch.optim.SGD(torch.nn.Linear(64, 10).parameters(), lr=0.01)"
COMPOSE = """\
from hydra import compose, initialize_config_dir
from dnnrun.cli.conf import CONFIG_DIR
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    compose("config", overrides=["optimizer=adam"])
"""
SEEDS = 10
HYDRA_APP = """\
import hydra
from dnnrun.cli.conf import CONFIG_DIR

@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def task(cfg):
    return None

task()
"""


def timed(command: list[str], cwd: Path, expect: int = 0) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        sys.exit(f"{' '.join(command)} exited {done.returncode}, expected {expect}:\n{done.stderr[-2000:]}")
    return seconds


def training_time(outputs: Path) -> float:
    """The epochs' own time, summed over every run under `outputs`."""
    return sum(
        json.loads(line).get("time/epoch_s", 0.0)
        for path in outputs.rglob("metrics.jsonl")
        for line in path.read_text().splitlines()
    )


def fresh(root: Path, name: str) -> Path:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def best(times: list[float]) -> float:
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dnnrun-startup-"))
    env_note = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    try:
        # (a) answers without torch
        hydra_s, typo_s, key_s, compose_s = [], [], [], []
        for _ in range(args.repeats):
            hydra_s.append(timed([sys.executable, "-c", "import hydra"], fresh(root, "a")))
            typo_s.append(timed([*DNNRUN, "optimizer=adamm"], fresh(root, "a"), expect=2))
            key_s.append(timed([*DNNRUN, "trainer.epochz=3"], fresh(root, "a"), expect=2))
            compose_s.append(timed([sys.executable, "-c", COMPOSE], fresh(root, "a")))

        # (b) the default run against importing torch and building an optimizer, plus the training itself
        floor_s, run_s = [], []
        for _ in range(args.repeats):
            floor_s.append(timed([sys.executable, "-c", FLOOR], fresh(root, "b")))
            where = fresh(root, "b")
            wall = timed(DNNRUN, where)
            run_s.append((wall, training_time(where / "outputs")))
        run_wall, run_train = min(run_s)

        # (c) per-job overhead of a sweep
        one, ten, hydra_one, hydra_ten = [], [], [], []
        seeds = ",".join(str(s) for s in range(SEEDS))
        app = root / "hydra_app.py"
        app.write_text(HYDRA_APP)
        no_report = "~hydra.callbacks.sweep_report"  # dnnrun's sweep report: nothing to report here
        for _ in range(args.sweep_repeats):
            where = fresh(root, "c")
            one.append(timed([*DNNRUN, "-m", "trainer.seed=0"], where) - training_time(where / "outputs"))
            where = fresh(root, "c")
            ten.append(timed([*DNNRUN, "-m", f"trainer.seed={seeds}"], where) - training_time(where / "outputs"))
            hydra_one.append(timed([sys.executable, str(app), "-m", "trainer.seed=0", no_report], fresh(root, "c")))
            hydra_ten.append(
                timed([sys.executable, str(app), "-m", f"trainer.seed={seeds}", no_report], fresh(root, "c"))
            )
        per_job = (best(ten) - best(one)) / (SEEDS - 1)
        hydra_per_job = (best(hydra_ten) - best(hydra_one)) / (SEEDS - 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    floor = best(floor_s) + run_train
    print(f"start-up of dnnrun ({env_note}); best of {args.repeats} (sweeps: of {args.sweep_repeats})")
    print(f"(a) python -c 'import hydra'          {best(hydra_s):6.3f} s")
    print(f"    Hydra composing dnnrun's config     {best(compose_s):6.3f} s")
    typo, key, hydra = best(typo_s), best(key_s), best(hydra_s)
    print(
        f"    dnnrun optimizer=adamm (a typo)     {typo:6.3f} s   {typo / hydra:.2f}x import hydra"
        f" (target <= 1.5), {typo / best(compose_s):.2f}x Hydra composing"
    )
    print(
        f"    dnnrun trainer.epochz=3 (a key)     {key:6.3f} s   {key / hydra:.2f}x import hydra, "
        f"{key / best(compose_s):.2f}x Hydra composing"
    )
    print(f"(b) import torch + torch.optim.SGD      {best(floor_s):6.3f} s")
    print(f"    + dnnrun's training (metrics.jsonl) {run_train:6.3f} s   = floor {floor:.3f} s")
    print(
        f"    dnnrun (digits, 20 epochs, plots)   {run_wall:6.3f} s   {run_wall / floor:.2f}x the floor (target <= 1.5)"
    )
    print(f"(c) 1-job multirun beyond training      {best(one):6.3f} s")
    print(
        f"    {SEEDS}-job multirun beyond training     {best(ten):6.3f} s   "
        f"{per_job * 1000:.0f} ms a job after the first (target <= 150)"
    )
    print(
        f"    Hydra alone, the same sweeps        {best(hydra_one):6.3f} s / {best(hydra_ten):.3f} s   "
        f"{hydra_per_job * 1000:.0f} ms a job after the first: dnnrun's own share "
        f"{(per_job - hydra_per_job) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
