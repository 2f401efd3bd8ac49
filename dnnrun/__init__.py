"""dnnrun: train deep neural networks from Hydra config groups and see why they train well or badly."""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """A trained model from a run directory, a checkpoint or an export: `dnnrun.load(RUN).predict(x)`
    (dnnrun/predict.py). torch is imported here, when a model is loaded, not with the package."""
    from dnnrun.predict import load as load_model

    return load_model(path, device)
