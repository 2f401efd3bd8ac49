"""`dnnrun --help`: every group and every option, each with the first comment line of its YAML."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from dnnrun.cli.conf import CONFIG_DIR

GROUP_HELP = {
    "data": "the dataset, its splits and input scaling",
    "model": "the network",
    "init": "how every Linear weight is initialized (biases start at zero)",
    "act": "the hidden layers' activation function",
    "norm": "a normalization layer in each hidden block",
    "optimizer": "the update rule",
    "schedule": "how the learning rate changes during training",
    "regularizer": "penalties, dropout and constraints; a list selects several: regularizer=[l2,dropout]",
    "trainer": "epochs, batch size, device, seed, early stopping, clipping, resuming, diagnostics",
    "logger": "where metrics go besides the run directory's JSON lines",
    "pretrain": "training the hidden layers without labels before supervised training",
    "experiment": "presets that set several groups at once",
}


def option_line(path: Path) -> str:
    """An option's one-line description: the first comment line of its YAML file."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("#").strip()
    return ""


def help_text() -> str:
    defaults: dict[str, object] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    groups = [g for g in GROUP_HELP if (CONFIG_DIR / g).is_dir()]
    groups += sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in GROUP_HELP and p.name != "hydra")
    lines = [
        "usage: dnnrun [-m] [group=option ...] [group.key=value ...]",
        "",
        "Trains a PyTorch model built from config groups and writes metrics, checkpoints and a summary",
        "to a run directory under outputs/. -m (--multirun) sweeps comma-separated values: act=relu,elu.",
    ]
    for group in groups:
        default = defaults.get(group)
        default = ",".join(default) if isinstance(default, list) else default
        lines += ["", f"{group}: {GROUP_HELP.get(group, '')}" + (f" (default: {default})" if default else "")]
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            lines.append(f"  {path.stem:<20} {option_line(path)}")
    lines += [
        "",
        "examples:",
        "  dnnrun optimizer=adam act=elu",
        "  dnnrun -m act=sigmoid,relu,elu,selu init=glorot_uniform,he_normal",
        "  dnnrun experiment=self_normalizing trainer.epochs=50",
        "  dnnrun mode=lr_find optimizer=adam            the learning-rate range test",
        "  dnnrun mode=evaluate evaluate.checkpoint=PATH evaluate.mc_samples=30",
        "  dnnrun --cfg job optimizer=nadam      print the composed config (every key you can override)",
        "",
        "sweeps (pip install -e \".[sweeps]\"): -m hydra/launcher=joblib (parallel jobs), hydra/launcher=slurm,",
        "  -m experiment=search (Optuna); torchrun --nproc_per_node=N -m dnnrun ... (one run on N GPUs);",
        "  dnnrun-report SWEEP_DIR; dnnrun-plot RUN_DIR",
        "  dnnrun --hydra-help                   Hydra's own flags",
    ]
    return "\n".join(lines)
