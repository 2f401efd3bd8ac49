"""The whole config: each group's schema, checked before anything runs (no torch imported)."""
