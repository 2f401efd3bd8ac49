"""dnnrun: train deep neural networks from Hydra config groups and see why they train well or badly."""

__version__ = "0.1.0"
