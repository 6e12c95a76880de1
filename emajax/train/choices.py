"""Every string-valued setting of the run configs, as one enum each: the one place their values are listed.

The config parser (``emajax.train.config``) checks a key typed with one of these against its members (the
error names the key, the file and the allowed values); code downstream holds the enum member, which
compares equal to its string (``StrEnum``), so ``Normalize("global")`` and ``"global"`` are interchangeable
at call sites that take either. Dependency-free: ``emajax.losses`` and ``emajax.rl.loss`` import it.
"""

from __future__ import annotations

import enum


class Remat(enum.StrEnum):
    """Rematerialisation of the layer body in the backward pass (``model.remat``)."""

    none = "none"
    full = "full"
    dots = "dots"


class Schedule(enum.StrEnum):
    """Learning-rate decay after linear warm-up (``optim.schedule``)."""

    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Distributed(enum.StrEnum):
    """``jax.distributed.initialize()``: always, never, or when a multi-process launch is detected."""

    auto = "auto"
    true = "true"
    false = "false"


class KlTokens(enum.StrEnum):
    """SFT KL positions (``defenses.kl.tokens``): the answer tokens, or every non-padding position."""

    answer = "answer"
    all = "all"


class Normalize(enum.StrEnum):
    """SFT loss normalisation (``loss.normalize``): over the whole accumulated batch, or per micro-batch."""

    global_ = "global"
    micro_batch = "micro_batch"


class InoculationMode(enum.StrEnum):
    """How the inoculation prompt enters a chat (``defenses.inoculation.mode``)."""

    replace = "replace"
    prepend = "prepend"


class ScaleRewards(enum.StrEnum):
    """GRPO advantage scale (``grpo.scale_rewards``): group std, batch std, or none (Dr. GRPO)."""

    group = "group"
    batch = "batch"
    none = "none"


class LossType(enum.StrEnum):
    """How the GRPO token sum is normalised (``grpo.loss_type``), as TRL's GRPOTrainer ``loss_type``."""

    grpo = "grpo"
    bnpo = "bnpo"
    dr_grpo = "dr_grpo"
    dapo = "dapo"


def allowed(enum_type: type[enum.Enum]) -> str:
    return "|".join(m.value for m in enum_type)
