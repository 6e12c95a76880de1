"""The pure, compiled training step: ``train_step(state, batch) -> (state, metrics)``.

Loss = masked CE (+ w_kl * token KL to the reference) (+ w_ldifs * LDIFS over captured
features), every term also reported as a metric by ``emajax.losses.compose``. The reference
forward pass runs only when a reference term is on, outside the differentiated function (its
outputs are constants: no gradient and no saved residuals), with the adapters off (LoRA) or on
the frozen initial copy (full FT). Steering (``state.steer_ld``) enters the trained forward pass
only. Micro-batches [A, B, T] are accumulated with ``lax.scan``; the step is jitted with the
state's explicit shardings and the state donated.

KL positions (``StepSpec.kl_tokens``): ``answer`` = the CE's answer tokens, ``all`` = every
non-padding input position (prompt included, as the paper's released code). Normalisation
(``StepSpec.normalize``): ``global`` divides each term by its count over the whole accumulated
batch (answer tokens for CE, the KL positions for KL, examples for LDIFS) and sums the
micro-batches, so the step equals one batch of A x B rows; ``micro_batch`` takes each
micro-batch's mean and averages them (docs/losses.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from emajax import losses
from emajax.models.sharding import activation_mesh
from emajax.train.choices import KlTokens, Normalize
from emajax.train.mesh import accum_batch_sharding, replicated
from emajax.train.state import TrainState, state_shardings
from emajax.train.update import accumulate, apply_gradients

BATCH_FIELDS = ("inputs", "targets", "loss_mask", "attn_mask", "positions")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    lora: bool
    kl_weight: float = 0.0
    kl_reverse: bool = False
    ldifs_weight: float = 0.0
    ldifs_layers: tuple[int, ...] = ()
    seq_chunk: int | None = None
    kl_tokens: KlTokens = KlTokens.answer
    normalize: Normalize = Normalize.global_

    def __post_init__(self) -> None:  # strings are accepted (and checked) as their members
        object.__setattr__(self, "kl_tokens", KlTokens(self.kl_tokens))
        object.__setattr__(self, "normalize", Normalize(self.normalize))

    @property
    def need_ref(self) -> bool:
        return self.kl_weight > 0 or self.ldifs_weight > 0


def kl_mask(spec: StepSpec, mb: dict[str, jax.Array]) -> jax.Array:
    """Positions the KL term averages over: the answer mask, or every non-padding input position."""
    return mb["loss_mask"] if spec.kl_tokens is KlTokens.answer else mb["attn_mask"].astype(jnp.float32)


def batch_denoms(spec: StepSpec, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Each term's count over a whole [A, B, T] batch: answer tokens (CE), KL positions, examples with a
    real token (LDIFS). Dividing every micro-batch's sum by these makes the accumulated step one batch."""
    return {"ce": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
            "kl": jnp.sum(kl_mask(spec, batch).astype(jnp.float32)),
            "ldifs": jnp.sum(jnp.any(batch["attn_mask"], axis=-1).astype(jnp.float32))}


def _forward(graphdef: Any, params: tuple[Any, ...], mb: dict[str, jax.Array], *, layers: tuple[int, ...],
             steer_ld: Any, lora_scale: float) -> tuple[Any, jax.Array]:
    model = nnx.merge(graphdef, *params)
    out = model(mb["inputs"], positions_bt=mb["positions"], attn_mask_bt=mb["attn_mask"], capture_layers=layers,
                steer_ld=steer_ld, lora_scale=lora_scale)
    return out, model.lm_head_dv()


def reference_outputs(graphdef: Any, spec: StepSpec, state: TrainState, mb: dict[str, jax.Array]) -> tuple[Any, Any]:
    """(ref forward output, ref lm head): adapters off (LoRA) or the frozen initial copy (full FT)."""
    layers = spec.ldifs_layers if spec.ldifs_weight > 0 else ()
    if spec.lora:
        params, scale = (jax.lax.stop_gradient(state.trainable), state.frozen), 0.0
    else:
        params, scale = (state.ref, state.frozen), 1.0
    out, w = _forward(graphdef, params, mb, layers=layers, steer_ld=None, lora_scale=scale)
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(w)


def loss_terms(graphdef: Any, spec: StepSpec, trainable: Any, state: TrainState, mb: dict[str, jax.Array],
               ref: tuple[Any, Any] | None, denoms: dict[str, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and per-term metrics of one micro-batch (differentiable in ``trainable``).

    ``denoms`` (``batch_denoms`` of the whole accumulated batch) makes each term this micro-batch's
    share of the batch mean; None takes the micro-batch's own mean."""
    d = denoms or {}
    layers = spec.ldifs_layers if spec.ldifs_weight > 0 else ()
    out, w_dv = _forward(graphdef, (trainable, state.frozen), mb, layers=layers, steer_ld=state.steer_ld,
                         lora_scale=1.0)
    mask = mb["loss_mask"]
    if ref is not None and spec.kl_weight > 0:
        # One pass over vocabulary chunks computes both terms (the trained logits are formed once) and
        # the gradient of ce + w kl (one product back through the output matrix per chunk). The "ce"
        # term carries that gradient (ce_kl - stop_gradient(ce_kl) is exactly 0 in value); "kl" is
        # reported and weighted in the total without a gradient of its own.
        ref_out, ref_w = ref
        ce_kl, ce, kl = losses.ce_plus_kl(out.hidden_btd, ref_out.hidden_btd, w_dv, ref_w, mb["targets"], mask,
                                          kl_mask(spec, mb), kl_weight=spec.kl_weight, reverse=spec.kl_reverse,
                                          seq_chunk=spec.seq_chunk, ce_denom=d.get("ce"), kl_denom=d.get("kl"))
        terms = {"ce": (1.0, ce + (ce_kl - jax.lax.stop_gradient(ce_kl))), "kl": (spec.kl_weight, kl)}
    else:
        terms = {"ce": (1.0, losses.masked_ce(out.hidden_btd, w_dv, mb["targets"], mask, seq_chunk=spec.seq_chunk,
                                              denom=d.get("ce")))}
    if ref is not None:
        ref_out, _ = ref
        if spec.ldifs_weight > 0:
            terms["ldifs"] = (spec.ldifs_weight, losses.ldifs(out.features, ref_out.features, mb["attn_mask"],
                                                              denom=d.get("ldifs")))
    total, metrics = losses.compose(terms)
    metrics = dict(metrics)
    metrics["loss"] = total
    return total, metrics


def make_step_fn(graphdef: Any, spec: StepSpec, tx: optax.GradientTransformation,
                 schedule: Callable[[Any], Any], mesh: Mesh | None = None
                 ) -> Callable[[TrainState, dict[str, jax.Array]], Any]:
    """The uncompiled step (see module doc); batch fields are [A, B, T]. With ``mesh``, activations
    are kept split over its batch axes (``emajax.models.sharding.constrain_rows``)."""

    def micro(state: TrainState, mb: dict[str, jax.Array], denoms: Any) -> tuple[Any, dict[str, jax.Array]]:
        ref = reference_outputs(graphdef, spec, state, mb) if spec.need_ref else None
        grad_fn = jax.grad(lambda tr: loss_terms(graphdef, spec, tr, state, mb, ref, denoms), has_aux=True)
        return grad_fn(state.trainable)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with activation_mesh(mesh):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        accum = batch["inputs"].shape[0]
        # global: every micro-batch contributes its sums over the whole batch's counts, so the sum over
        # micro-batches is the batch mean; micro_batch: own means, averaged.
        denoms = batch_denoms(spec, batch) if spec.normalize is Normalize.global_ else None
        grads, metrics = accumulate(lambda mb: micro(state, mb, denoms), state.trainable, batch)
        if accum > 1 and spec.normalize is Normalize.micro_batch:
            grads = jax.tree.map(lambda g: g * (1.0 / accum), grads)
            metrics = jax.tree.map(lambda m: m * (1.0 / accum), metrics)
        new, metrics = apply_gradients(state, grads, metrics, tx, schedule)
        rng, _ = jax.random.split(state.rng)
        return new._replace(rng=rng), metrics

    return step


def batch_shardings(mesh: Mesh) -> dict[str, Any]:
    sh = accum_batch_sharding(mesh)
    return {k: sh for k in BATCH_FIELDS}


def compile_train_step(graphdef: Any, spec: StepSpec, tx: optax.GradientTransformation, schedule: Callable,
                       state: TrainState, mesh: Mesh) -> Callable:
    """jit with explicit in/out shardings (those of ``state``; batch rows over data x fsdp), state donated."""
    st_sh = state_shardings(state)
    return jax.jit(make_step_fn(graphdef, spec, tx, schedule, mesh), in_shardings=(st_sh, batch_shardings(mesh)),
                   out_shardings=(st_sh, replicated(mesh)), donate_argnums=(0,))


def make_eval_fn(graphdef: Any, seq_chunk: int | None = None, mesh: Mesh | None = None) -> Callable:
    """(trainable, frozen, batch[1,B,T]) -> (sum of answer-token NLL, answer-token count).

    No steering, adapters on, never the inoculation prompt (eval data is rendered plainly). With
    ``mesh``, activations stay split over its batch axes."""

    def ev(trainable: Any, frozen: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        mb = {k: v[0] for k, v in batch.items()}
        with activation_mesh(mesh):
            out, w = _forward(graphdef, (trainable, frozen), mb, layers=(), steer_ld=None, lora_scale=1.0)
            nll = losses.token_nll(out.hidden_btd, w, mb["targets"], seq_chunk=seq_chunk)
        m = mb["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(m)

    return jax.jit(ev)
