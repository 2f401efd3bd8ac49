"""One prepared GPU check: every GPU claim of the documentation measured in one call (about 5 minutes on
one H100, at most 8), printed as one table (ours and baseline in seconds, memory in MiB). Without
CUDA, or with --dry-run, the same code paths run on toy sizes and models in seconds (the tests run
it so; its figures then mean nothing).

    check                       what is timed (best of --repeats, alternating)                 figure
    amp+channels-last cnn       experiment=fashion_cnn, one epoch: amp=auto channels_last=auto  float32 / ours
    amp+channels-last resnet    experiment=cifar10_resnet (ResNet-20), likewise                 float32 / ours
    compile                     the 784-300-100 MLP, epochs 2-3 (after compiling) with          without / with
                                trainer.compile=true against without
    members K=8                 8 members of the digits default against 8 runs one after        sequential / members
                                another, whole runs (bench/members.py)
    images cnn, resnet          dnnrun's loop against the plain loop (bench/images.py)          dnnrun / plain
    throughput b32, b256        dnnrun's loop against the plain loop (bench/throughput.py)      dnnrun / plain
    memory mlp, cnn, resnet     runtime.memory_needed against torch.cuda.max_memory_allocated   estimate / peak
                                over 20 steps and a validation pass (>= 1: the estimate covers it)
    per-step read               the MLP at batch 32, one epoch reading the loss every step      every step / every 32
                                (a host synchronisation) against every loop.CHECK_EVERY steps

    python bench/gpu.py [--repeats 3] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import images  # the other benches (bench/ is on the path of a script run from it)
import members as members_bench
import throughput
import torch

from dnnrun.cli.process import keep_freed_memory
from dnnrun.data.datasets import Data, Split
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import loop, runtime

ROWS: list[tuple[str, str, str, str, str]] = []  # check, ours, baseline, figure, claim
DRY = {"cnn": ("model.channels=[4,8]", "model.head=[16]"), "resnet": ("model.depth=8", "model.width=4")}  # toy models
WARM = True  # one untimed run of each before the timed ones (not in the dry run)


def row(check: str, ours: float | None, baseline: float | None, figure: float | None, claim: str) -> None:
    def text(v):
        return "-" if v is None else f"{v:.3f}"

    ROWS.append((check, text(ours), text(baseline), text(figure), claim))
    print(f"  {check}: {text(ours)} / {text(baseline)} -> {text(figure)}  ({claim})", file=sys.stderr, flush=True)


def best(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each run's seconds: one untimed run each, then alternating, the best of `repeats`."""
    for run in runs.values() if WARM else ():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: min(t) for name, t in times.items()}


def images_data(model: str, samples: int, device: torch.device) -> Data:
    shape = images.MODELS[model][1]
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (samples, *shape), generator=g, dtype=torch.uint8).float() / 255).to(device)
    y = torch.randint(0, 10, (samples,), generator=g).to(device)
    held = Split(x[: max(samples // 50, 16)], y[: max(samples // 50, 16)])
    return Data(Split(x, y), held, held, n_features=x[0].numel(), n_classes=10, shape=shape, unlabeled=x)


def mlp_data(samples: int, device: torch.device) -> Data:
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (samples, 1, 28, 28), generator=g, dtype=torch.uint8).float() / 255).to(device)
    y = torch.randint(0, 10, (samples,), generator=g).to(device)
    held = Split(x[:1000], y[:1000])
    return Data(Split(x, y), held, held, n_features=784, n_classes=10, shape=(1, 28, 28), unlabeled=x)


def image_config(args, model: str, device: torch.device, *extra: str):
    return images.config(model, device, (*extra, *(DRY[model] if args.dry_run else ())))


def amp_and_channels_last(args, device: torch.device) -> None:
    for model in ("cnn", "resnet"):
        data = images_data(model, args.samples, device)
        fast = image_config(args, model, device, "trainer.amp=auto", "trainer.channels_last=auto")
        plain = image_config(args, model, device, "trainer.amp=false", "trainer.channels_last=false")
        t = best(
            {"ours": lambda c=fast: throughput.dnnrun_epoch(c, data, device),
             "fp32": lambda c=plain: throughput.dnnrun_epoch(c, data, device)},
            args.repeats,
        )  # fmt: skip
        row(f"amp+channels-last {model}", t["ours"], t["fp32"], t["fp32"] / t["ours"], "speed-up over float32 NCHW")


def compiled(args, device: torch.device) -> None:
    if args.dry_run:  # on 2 CPU cores compiling takes about 20 s
        row("compile mlp", None, None, None, "not run in the dry run (torch.compile takes ~20 s on a CPU)")
        return
    data = mlp_data(args.samples, device)

    def epochs(flag: str) -> float:
        cfg = throughput.config(256, 0, device, ("trainer.epochs=3", f"trainer.compile={flag}"))
        with tempfile.TemporaryDirectory() as tmp:
            throughput.dnnrun_epoch(cfg, data, device, keep=tmp)
            return min(r["time/epoch_s"] for r in read_jsonl(Path(tmp) / "metrics.jsonl")[1:])

    t = {"on": epochs("true"), "off": epochs("false")}  # one each: every run compiles again
    row("compile mlp", t["on"], t["off"], t["off"] / t["on"], "speed-up of trainer.compile=true (epochs 2-3)")


def members(args, device: torch.device) -> None:
    members_bench.DEVICE = str(device)
    k = 2 if args.dry_run else 8
    overrides = ["data=digits", "trainer.batch_size=32", f"trainer.epochs={1 if args.dry_run else 3}"]
    runs = {"members": lambda: members_bench.together(overrides, k),
            "one by one": lambda: members_bench.sequential(overrides, k)}  # fmt: skip
    t = best(runs, min(args.repeats, 2))
    row(f"members K={k}", t["members"], t["one by one"], t["one by one"] / t["members"], "speed-up over separate runs")


def loops_against_plain(args, device: torch.device) -> None:
    for model in ("cnn", "resnet"):
        data, cfg = images_data(model, args.samples, device), image_config(args, model, device)
        host = (data.train.x.cpu(), data.train.y.cpu())
        runs = {
            kind: lambda k=kind: images.one_epoch(k, model, data, host, device, cfg) for kind in ("plain", "dnnrun")
        }
        t = best(runs, args.repeats)
        row(f"images {model}", t["dnnrun"], t["plain"], t["dnnrun"] / t["plain"], "dnnrun / plain loop <= 1.10")
    data = mlp_data(args.samples, device)
    for batch in (32, 256):
        runs = {kind: lambda k=kind: throughput.one_epoch(k, data, batch, device) for kind in ("plain", "dnnrun")}
        t = best(runs, args.repeats)
        row(f"throughput b{batch}", t["dnnrun"], t["plain"], t["dnnrun"] / t["plain"], "dnnrun / plain loop <= 1.10")


def memory(args, device: torch.device) -> None:
    cases = {
        "mlp": (throughput.config(256, 0, device, ("trainer.limit_batches=20",)), mlp_data(args.samples, device)),
        "cnn": (image_config(args, "cnn", device, "trainer.limit_batches=20"),
                images_data("cnn", args.samples, device)),
        "resnet": (image_config(args, "resnet", device, "trainer.limit_batches=20"),
                   images_data("resnet", args.samples, device)),
    }  # fmt: skip
    for name, (cfg, data) in cases.items():
        with torch.device("meta"):
            model, _ = runtime.build_model(cfg, data)
        estimate = runtime.memory_needed(model, cfg, data.shape) / 2**20
        if device.type != "cuda":
            throughput.dnnrun_epoch(cfg, data, device)
            row(f"memory {name}", estimate, None, None, "MiB estimated; the peak is CUDA's only")
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # the data, already on the device
        throughput.dnnrun_epoch(cfg, data, device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row(f"memory {name}", estimate, peak, estimate / peak, "MiB estimated / peak allocated: >= 1 covers it")


def per_step_read(args, device: torch.device) -> None:
    data = mlp_data(args.samples, device)
    cfg = throughput.config(32, 0, device)
    every = loop.CHECK_EVERY

    def epoch(n: int) -> float:
        loop.CHECK_EVERY = n
        try:
            return throughput.dnnrun_epoch(cfg, data, device)
        finally:
            loop.CHECK_EVERY = every

    t = best({"each": lambda: epoch(1), "every": lambda: epoch(every)}, args.repeats)
    claim = "reading every step / every CHECK_EVERY steps" + (
        " (the CPU reads each step anyway)" * (device.type == "cpu")
    )
    row("per-step read b32", t["each"], t["every"], t["each"] / t["every"], claim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=None, help="examples per epoch (default: 20000; dry run 256)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, CPU allowed (the tests' run)")
    args = parser.parse_args(argv)
    device = runtime.resolve_device("auto")
    args.dry_run = args.dry_run or device.type != "cuda"
    args.samples = args.samples or (256 if args.dry_run else 20_000)
    if args.dry_run:
        global WARM
        args.repeats, WARM = 1, False
    logging.getLogger("dnnrun").setLevel(logging.WARNING)
    keep_freed_memory()  # as the dnnrun command does for its process
    runtime.warm_up()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' results tables
        for check in (amp_and_channels_last, compiled, members, loops_against_plain, memory, per_step_read):
            check(args, device)
    print(f"bench/gpu.py on {runtime.device_name(device)}, torch {torch.__version__}, best of {args.repeats}, "
          f"{args.samples} examples an epoch{' (dry run: the figures mean nothing)' if args.dry_run else ''}; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    widths = [max(len(r[i]) for r in [("check", "ours", "baseline", "figure", "claim"), *ROWS]) for i in range(5)]
    for r in [("check", "ours", "baseline", "figure", "claim"), *ROWS]:
        print("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
