"""Data-side and forward-side defenses against emergent misalignment used by ``emajax.train``."""
