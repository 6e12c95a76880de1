"""``emajax demo``: no defense and every defense trained on the project's own narrow task, measured by the
judge-free probes, reported (``plan`` = what runs at each scale, ``suite`` = data and probes,
``pipeline`` = the resumable stages)."""
