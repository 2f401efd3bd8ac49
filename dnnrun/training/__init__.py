"""Training: the loop, its engines (one module, or stacked members), its callbacks, resume."""
