"""The technique options of the layers: initializers, activations, norms, regularizers."""
