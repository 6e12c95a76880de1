"""Training with in-training defenses: config, data, the compiled step, checkpoints, the run loop.

Entry point: ``emajax.train.loop.train(cfg, run_dir)`` (what ``emajax train`` calls); ``emajax.train.core``
and ``emajax.train.update`` are the run skeleton and the update pieces ``emajax rl`` shares.
"""
