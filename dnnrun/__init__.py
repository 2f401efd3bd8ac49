"""dnnrun: train deep neural networks from Hydra config groups and see why they train well or badly."""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """A trained model from a run directory, a checkpoint or an export: `dnnrun.load(RUN).predict(x)`
    (dnnrun/inference/predict.py). torch is imported here, when a model is loaded, not with the package."""
    from dnnrun.inference.predict import load as load_model

    return load_model(path, device)


def fit(overrides: list[str] | tuple[str, ...] = (), run_dir=None) -> dict:
    """Train as `dnnrun OVERRIDES...` would, in this process (a notebook), and return the run's
    summary (summary.json's contents). The run directory: `run_dir`, else outputs/DATE/TIME under
    the config's `outputs`. The command line's extras are not done here: sweeps, the directory's
    lock and .hydra/ snapshot (so `dnnrun rerun=` cannot repeat such a run)."""
    import datetime
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dnnrun.cli.conf import CONFIG_DIR, CONFIG_NAME
    from dnnrun.config.run_config import parse_run_config
    from dnnrun.training import loop

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = OmegaConf.to_container(compose(CONFIG_NAME, overrides=list(overrides)), resolve=True)
    cfg = parse_run_config(raw)
    run_dir = run_dir or Path(cfg.outputs) / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    return loop.run(cfg, run_dir)
