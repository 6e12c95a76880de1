"""emajax: fine-tuning in JAX/Flax with in-training defenses against emergent misalignment."""

__version__ = "0.1.0"
