"""The compiled train step: reference terms, steering isolation, mesh equivalence (tiny model)."""

from __future__ import annotations

import dataclasses

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import TINY, tiny_model  # noqa: E402

from emajax.models.decoder import steering_array  # noqa: E402
from emajax.models.sharding import make_mesh  # noqa: E402
from emajax.train.config import OptimCfg  # noqa: E402
from emajax.train.mesh import put_global  # noqa: E402
from emajax.train.optim import make_optimizer  # noqa: E402
from emajax.train.state import create_state  # noqa: E402
from emajax.train.step import (StepSpec, batch_shardings, compile_train_step, loss_terms, make_eval_fn,  # noqa: E402
                               reference_outputs)

A, B, T = 2, 8, 16


def host_batch(seed: int = 0, accum: int = A) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (accum, B, T)
    attn = np.ones(shape, bool)
    attn[:, ::3, T - 5:] = False  # some right padding
    lm = (rng.random(shape) < 0.7) & attn
    return dict(inputs=rng.integers(0, TINY.vocab_size, shape).astype(np.int32),
                targets=rng.integers(0, TINY.vocab_size, shape).astype(np.int32),
                loss_mask=lm.astype(np.float32), attn_mask=attn,
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy())


def perturbed_lora_model(seed: int = 0):
    """LoRA B is zero at init (theta = theta_ref); give it values so the adapters do something."""
    m = tiny_model()
    key = jax.random.PRNGKey(seed + 1)
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
            key, k = jax.random.split(key)
            var[...] = 0.3 * jax.random.normal(k, var.shape)
    return m


def setup(model, mesh, spec, steer=None):
    # eps=1e-4: Adam's first update is ~sign(g), which would turn a rounding-level gradient on an
    # element into a full-lr difference between two otherwise equal runs.
    tx, sch = make_optimizer(OptimCfg(warmup_steps=0, lr=1e-2, eps=1e-4), 10)
    g, st = create_state(model, lora=spec.lora, tx=tx, mesh=mesh, need_ref=spec.need_ref, steer_ld=steer)
    return g, st, tx, sch


def mb0(batch):
    return {k: jnp.asarray(v[0]) for k, v in batch.items()}


@pytest.mark.parametrize("lora", [True, False])
def test_kl_zero_with_zero_grad_at_reference(lora):
    spec = StepSpec(lora=lora, kl_weight=1.0)
    model = tiny_model(lora=tiny_model().lora_config if lora else None)
    g, st, _, _ = setup(model, make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec)
    mb = mb0(host_batch())

    ce_only = dataclasses.replace(spec, kl_weight=0.0)

    @jax.jit
    def kl_and_grads(st, mb):
        # The step differentiates ce + w kl as one fused term (losses.ce_plus_kl): the KL part's gradient
        # is the difference from the CE-only step's gradient.
        ref = reference_outputs(g, spec, st, mb)
        total_g, metrics = jax.grad(lambda tr: loss_terms(g, spec, tr, st, mb, ref), has_aux=True)(st.trainable)
        ce_g = jax.grad(lambda tr: loss_terms(g, ce_only, tr, st, mb, None)[0])(st.trainable)
        return metrics["kl"], jax.tree.map(jnp.subtract, total_g, ce_g), ce_g

    kl, grads, ce_g = kl_and_grads(st, mb)
    assert abs(float(kl)) < 1e-6
    gmax = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads))
    assert gmax < 1e-6, gmax
    # ... and the CE gradient is not zero, so the zero above is not vacuous
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ce_g)) > 1e-4


def test_kl_gradient_in_the_step_is_the_weighted_token_kl_gradient():
    """Away from the reference, the step's total gradient minus its CE-only gradient is kl_weight x the
    gradient of losses.token_kl on the same hidden states (the fused term trains the KL, not only CE)."""
    from emajax import losses
    from emajax.train.step import _forward

    spec = StepSpec(lora=True, kl_weight=0.3)
    g, st, _, _ = setup(perturbed_lora_model(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec)
    mb = mb0(host_batch())

    @jax.jit
    def parts(st, mb):
        ref = reference_outputs(g, spec, st, mb)
        total_g, metrics = jax.grad(lambda tr: loss_terms(g, spec, tr, st, mb, ref), has_aux=True)(st.trainable)
        ce_g = jax.grad(lambda tr: loss_terms(g, dataclasses.replace(spec, kl_weight=0.0), tr, st, mb, None)[0])(
            st.trainable)

        def kl_only(tr):
            out, w = _forward(g, (tr, st.frozen), mb, layers=(), steer_ld=st.steer_ld, lora_scale=1.0)
            return spec.kl_weight * losses.token_kl(out.hidden_btd, ref[0].hidden_btd, w, ref[1], mb["loss_mask"])

        return metrics["kl"], jax.tree.map(jnp.subtract, total_g, ce_g), jax.grad(kl_only)(st.trainable)

    kl, diff, want = parts(st, mb)
    assert float(kl) > 1e-4
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want)) > 1e-5
    for a, b in zip(jax.tree.leaves(diff), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-6)


def test_ldifs_has_gradient_wrt_trainable_params():
    spec = StepSpec(lora=True, ldifs_weight=1.0, ldifs_layers=(1, 3, 4))
    g, st, _, _ = setup(perturbed_lora_model(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec)
    mb = mb0(host_batch())

    @jax.jit
    def ldifs_and_grads(st, mb):
        ref = reference_outputs(g, spec, st, mb)
        return jax.value_and_grad(lambda tr: loss_terms(g, spec, tr, st, mb, ref)[1]["ldifs"])(st.trainable)

    val, grads = ldifs_and_grads(st, mb)
    assert float(val) > 0
    norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(grads)]
    assert min(norms) > 0 and sum(norms) > 1e-4  # every A and B gets a gradient from LDIFS


def test_steering_changes_training_forward_not_eval_or_generation():
    from emajax.generate import generate

    spec = StepSpec(lora=True)
    rng = np.random.default_rng(3)
    steer = steering_array(TINY, {2: rng.normal(size=TINY.hidden_size)}, 5.0)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    g0, st0, _, _ = setup(tiny_model(), mesh, spec)
    g1, st1, _, _ = setup(tiny_model(), mesh, spec, steer=steer)
    mb = mb0(host_batch())
    ce0 = float(jax.jit(lambda st, mb: loss_terms(g0, spec, st.trainable, st, mb, None)[0])(st0, mb))
    ce1 = float(jax.jit(lambda st, mb: loss_terms(g1, spec, st.trainable, st, mb, None)[0])(st1, mb))
    assert abs(ce1 - ce0) > 1e-3  # the trained forward pass is steered
    ev = make_eval_fn(g0)
    batch1 = {k: jnp.asarray(v[:1]) for k, v in host_batch().items()}
    e0, e1 = ev(st0.trainable, st0.frozen, batch1), ev(st1.trainable, st1.frozen, batch1)
    np.testing.assert_array_equal(np.asarray(e0[0]), np.asarray(e1[0]))
    # generation / export use the merged model, which carries no steering
    m0, m1 = nnx.merge(g0, st0.trainable, st0.frozen), nnx.merge(g1, st1.trainable, st1.frozen)
    prompts = [[256, 70, 71, 72], [256, 80, 81]]
    assert generate(m0, None, prompts, max_new_tokens=5) == generate(m1, None, prompts, max_new_tokens=5)


def _run_step(mesh, spec, host):
    g, st, tx, sch = setup(perturbed_lora_model(), mesh, spec)
    step = compile_train_step(g, spec, tx, sch, st, mesh)
    bs = batch_shardings(mesh)
    st, met = step(st, {k: put_global(v, bs[k]) for k, v in host.items()})
    sh = jax.tree.map(lambda x: x.sharding.spec, st.trainable)
    return jax.device_get(st.trainable), jax.device_get(met), sh


@pytest.mark.devices(8)
def test_mesh_2x2x2_step_equals_single_device():
    spec = StepSpec(lora=True, kl_weight=0.1, ldifs_weight=1.0, ldifs_layers=(2, 4))
    host = host_batch(7)
    p1, m1, _ = _run_step(make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec, host)
    p8, m8, specs = _run_step(make_mesh(2, 2, 2), spec, host)
    assert any(s != jax.sharding.PartitionSpec() and any(a is not None for a in s) for s in jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))  # really sharded
    assert set(m1) == set(m8) >= {"loss", "ce", "kl", "ldifs", "grad_norm", "lr"}
    for k in m1:
        assert abs(m1[k] - m8[k]) <= 1e-5 * max(abs(m1[k]), 1e-30), (k, m1[k], m8[k])
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


# ----------------------------------------------------------------------------- KL positions, accumulation
def test_kl_tokens_all_averages_over_every_non_padding_position():
    """defenses.kl.tokens: all (the released code's choice) = the naive KL mean over the attention mask;
    answer (the default) = over the answer mask; the two differ on a batch with prompts."""
    from emajax.train.step import _forward

    mb = mb0(host_batch(5))
    kls = {}
    for tokens in ("answer", "all"):
        spec = StepSpec(lora=True, kl_weight=0.5, kl_tokens=tokens)
        g, st, _, _ = setup(perturbed_lora_model(), make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec)

        @jax.jit
        def both(st, mb):
            ref = reference_outputs(g, spec, st, mb)
            out, w = _forward(g, (st.trainable, st.frozen), mb, layers=(), steer_ld=None, lora_scale=1.0)
            logp = jax.nn.log_softmax(out.hidden_btd @ w, axis=-1)
            logq = jax.nn.log_softmax(ref[0].hidden_btd @ ref[1], axis=-1)
            kl_bt = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
            return loss_terms(g, spec, st.trainable, st, mb, ref)[1]["kl"], kl_bt

        kls[tokens], kl_bt = both(st, mb)
        m = np.asarray(mb["attn_mask"] if tokens == "all" else mb["loss_mask"], np.float64)
        want = float((np.asarray(kl_bt, np.float64) * m).sum() / m.sum())
        np.testing.assert_allclose(float(kls[tokens]), want, rtol=1e-4)
    assert abs(float(kls["all"]) - float(kls["answer"])) > 1e-3 * float(kls["answer"])


def _uneven_rows(n: int = 4) -> dict[str, np.ndarray]:
    """n rows with very different answer lengths (3 .. 13 answer tokens) and some padding."""
    rng = np.random.default_rng(11)
    shape = (1, n, T)
    attn = np.zeros(shape, bool)
    lm = np.zeros(shape, np.float32)
    for r, (length, answer) in enumerate([(16, 13), (9, 3), (12, 8), (6, 4)][:n]):
        attn[0, r, :length] = True
        lm[0, r, length - answer:length] = 1.0
    return dict(inputs=rng.integers(0, TINY.vocab_size, shape).astype(np.int32),
                targets=rng.integers(0, TINY.vocab_size, shape).astype(np.int32),
                loss_mask=lm, attn_mask=attn, positions=np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy())


def test_accumulation_4x1_equals_one_batch_of_4_on_uneven_answers():
    """loss.normalize: global (the default) makes 4 micro-batches of 1 row the same optimiser step as one
    batch of 4 rows: every term divides by its count over the accumulated batch. The per-micro-batch mean
    (micro_batch) weighs a 3-token answer like a 13-token one, so it differs: the test can fail."""
    spec = StepSpec(lora=True, kl_weight=0.3, kl_tokens="all", ldifs_weight=0.5, ldifs_layers=(2, 4))
    one = _uneven_rows()
    four = {k: np.moveaxis(v, 1, 0) for k, v in one.items()}  # [4, 1, T]: the same rows, one per micro-batch
    p1, m1, _ = _run_step(make_mesh(1, 1, 1, devices=jax.devices()[:1]), spec, one)
    keys = ("loss", "ce", "kl", "ldifs", "grad_norm")
    for normalize in ("global", "micro_batch"):
        p4, m4, _ = _run_step(make_mesh(1, 1, 1, devices=jax.devices()[:1]), dataclasses.replace(spec, normalize=normalize), four)
        dist = max(float(np.linalg.norm(a - b) / np.linalg.norm(a))
                   for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))
        gap = max(abs(m1[k] - m4[k]) / max(abs(m1[k]), 1e-30) for k in keys)
        if normalize == "global":
            assert dist <= 1e-5 and gap <= 1e-5, (dist, gap)
        else:
            assert gap > 1e-3, gap
