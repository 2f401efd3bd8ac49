"""dnnrun's Optuna sweeper, found by Hydra's plugin discovery (the hydra_plugins namespace)."""
