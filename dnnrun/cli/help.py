"""`dnnrun --help`: every group and every option, each with the first comment line of its YAML,
and every setting that config.yaml holds itself (mode, transfer.*, ...) with its default and comment."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from dnnrun.cli.conf import CONFIG_DIR

GROUP_HELP = {
    "data": "the dataset, its splits and input scaling",
    "model": "the network",
    "init": "how every Linear and Conv weight is initialized (biases start at zero)",
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


def group_options(group: str) -> list[tuple[str, Path]]:
    """A group's options as they are chosen (experiment=chapter/prelu for a file in a folder), with their files."""
    folder = CONFIG_DIR / group
    paths = sorted(folder.rglob("*.yaml"), key=lambda p: (len(p.relative_to(folder).parts), p))
    return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in paths]


def settings(path: Path = CONFIG_DIR / "config.yaml") -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The values a config file sets itself (not its defaults list, not the hydra node), as
    (section, the section's comment, [(key=default, the key's comment), ...]): the top-level values
    first, in a section named "", then each top-level mapping, its keys dotted (transfer.source).
    A comment is the one on the key's line; the default is the value as the file spells it."""
    text = path.read_text()
    lines = text.splitlines()

    def comment(key: yaml.Node, value: yaml.Node) -> str:
        line = lines[key.start_mark.line]
        same_line = value.end_mark.line == key.start_mark.line
        rest = line[value.end_mark.column if same_line else key.end_mark.column :]
        return rest.partition("#")[2].strip()

    def literal(key: yaml.Node, value: yaml.Node) -> str:
        if value.start_mark.line != key.start_mark.line or value.end_mark.line != value.start_mark.line:
            return "..."  # a block value: --cfg job shows it
        return lines[value.start_mark.line][value.start_mark.column : value.end_mark.column]

    def leaves(node: yaml.MappingNode, prefix: str) -> list[tuple[str, str]]:
        found = []
        for key, value in node.value:
            if isinstance(value, yaml.MappingNode) and value.flow_style is False:
                found += leaves(value, f"{prefix}{key.value}.")
            else:
                found.append((f"{prefix}{key.value}={literal(key, value)}", comment(key, value)))
        return found

    top: list[tuple[str, str]] = []
    sections: list[tuple[str, str, list[tuple[str, str]]]] = [("", "", top)]
    for key, value in yaml.compose(text).value:
        if key.value in ("defaults", "hydra"):
            continue
        if isinstance(value, yaml.MappingNode) and value.flow_style is False:
            sections.append((key.value, comment(key, value), leaves(value, f"{key.value}.")))
        else:
            top.append((f"{key.value}={literal(key, value)}", comment(key, value)))
    return [s for s in sections if s[2]]


def help_text() -> str:
    defaults: dict[str, object] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    groups = [g for g in GROUP_HELP if (CONFIG_DIR / g).is_dir()]
    groups += sorted(
        p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in GROUP_HELP and p.name != "hydra"
    )
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
        options = group_options(group)
        width = max([20, *(len(option) for option, _ in options)])
        for option, path in options:
            lines.append(f"  {option:<{width}} {option_line(path)}")
    found = settings()
    width = max((len(key) for _, _, keys in found for key, _ in keys), default=0)
    for section, about, keys in found:
        lines += ["", f"{section}: {about}" if section else "settings outside the groups (key=default):"]
        lines += [f"  {key:<{width}}  {text}".rstrip() for key, text in keys]
    lines += [
        "",
        "examples:",
        "  dnnrun optimizer=adam act=elu",
        "  dnnrun -m act=sigmoid,relu,elu,selu init=glorot_uniform,he_normal",
        "  dnnrun experiment=self_normalizing trainer.epochs=50",
        "  dnnrun mode=lr_find optimizer=adam            the learning-rate range test",
        "  dnnrun mode=evaluate evaluate.checkpoint=PATH evaluate.mc_samples=30",
        "  dnnrun mode=predict predict.checkpoint=RUN_DIR predict.input=x.npy   predictions.csv",
        "  dnnrun rerun=RUN_DIR                  a finished run again, exactly, into a new directory",
        "  dnnrun-export RUN_DIR --format onnx   the model with its preprocessing (default: safetensors)",
        "  dnnrun --cfg job optimizer=nadam      print the composed config (every key you can override)",
        "",
        'sweeps (pip install -e ".[sweeps]"): -m hydra/launcher=joblib (parallel jobs), hydra/launcher=slurm,',
        "  -m experiment=search (Optuna); torchrun --nproc_per_node=N -m dnnrun ... (one run on N GPUs);",
        "  dnnrun-report SWEEP_DIR; dnnrun-plot RUN_DIR",
        "  dnnrun --hydra-help                   Hydra's own flags",
        "  dnnrun --version                      dnnrun's, PyTorch's, Hydra's and Python's versions",
    ]
    return "\n".join(lines)
