"""The compiled GRPO update on the tiny model: KL zero at step 0, the reference never steered, steered decoding."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import TINY, tiny_model  # noqa: E402

from emajax.models.decode import DecodeCache, decode_weights, forward_cached  # noqa: E402
from emajax.models.decoder import steering_array  # noqa: E402
from emajax.models.lora import LoraConfig  # noqa: E402
from emajax.models.sharding import make_mesh  # noqa: E402
from emajax.rl.loss import metric_weights, token_logp_entropy  # noqa: E402
from emajax.rl.rollout import update_batch  # noqa: E402
from emajax.rl.step import RlStepSpec, compile_rl_step  # noqa: E402
from emajax.train.config import OptimCfg  # noqa: E402
from emajax.train.optim import make_optimizer  # noqa: E402
from emajax.train.state import create_state  # noqa: E402
from emajax.train.step import BATCH_FIELDS  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8.0)


def _steer(coef: float):
    v = np.random.default_rng(7).normal(size=TINY.hidden_size).astype(np.float32)
    return steering_array(TINY, {2: v / np.linalg.norm(v)}, coef)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 250, size=n).astype(np.int32) for n in (5, 9)]
    comps = [list(rng.integers(3, 250, size=n)) for n in (4, 7, 1, 6)]
    hb = update_batch(prompts, comps, group_size=2, micro_batch=2, min_bucket=16, max_len=64, pad_id=257)
    batch = {k: jnp.asarray(v) for k, v in hb._asdict().items()}
    batch["advantages"] = jnp.asarray([[1.0, -1.0], [0.5, -0.5]], jnp.float32)
    return batch


@nnx.jit
def _expected_kl(model, batch, steer_ld):
    """Token-weighted k3 KL between the steered policy and the unsteered, adapters-off reference."""
    kls, wts = [], metric_weights(batch["loss_mask"])
    for a in range(batch["inputs"].shape[0]):
        mb = {k: batch[k][a] for k in BATCH_FIELDS}
        kw = dict(positions_bt=mb["positions"], attn_mask_bt=mb["attn_mask"])
        lp, _ = token_logp_entropy(model(mb["inputs"], steer_ld=steer_ld, **kw).hidden_btd, model.lm_head_dv(),
                                   mb["targets"], mb["loss_mask"])
        rlp, _ = token_logp_entropy(model(mb["inputs"], lora_scale=0.0, **kw).hidden_btd, model.lm_head_dv(),
                                    mb["targets"], mb["loss_mask"])
        kls.append(jnp.sum(wts[a] * (jnp.exp(rlp - lp) - (rlp - lp) - 1.0)))
    return sum(kls)


def test_kl_zero_at_step_0_and_reference_unsteered():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimCfg(lr=1e-2, warmup_steps=0), 10)
    spec = RlStepSpec(lora=True, log_kl=True)
    batch = _batch()
    results = {}
    step = None
    for coef in (0.0, 8.0):  # zeros and a real vector share one compiled program
        model = tiny_model(lora=LORA, seed=2)  # fresh adapters (B = 0): the policy is the reference
        steer = _steer(coef)
        expected = float(_expected_kl(model, batch, steer))
        graphdef, state = create_state(model, lora=True, tx=tx, mesh=mesh, need_ref=True, steer_ld=steer)
        step = step or compile_rl_step(graphdef, spec, tx, schedule, state, mesh)
        new_state, m = step(state, batch)
        results[coef] = (float(m["kl"]), expected, float(m["ratio"]), int(new_state.step))
    kl0, exp0, ratio0, steps0 = results[0.0]
    assert abs(kl0) < 1e-6 and abs(exp0) < 1e-6 and abs(ratio0 - 1.0) < 1e-6 and steps0 == 1
    kl8, exp8, _, _ = results[8.0]
    # steering moves the policy but not the reference: a clearly positive KL, equal to the unsteered-reference one
    assert kl8 > 1e-3
    np.testing.assert_allclose(kl8, exp8, rtol=1e-4)


def _rollout_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 250, size=k).astype(np.int32) for k in rng.integers(20, 90, size=n // 4)]
    comps = [list(rng.integers(3, 250, size=k)) for k in rng.integers(1, 60, size=n)]
    hb = update_batch(prompts, comps, group_size=4, micro_batch=8, min_bucket=64, max_len=256, pad_id=257)
    batch = {k: jnp.asarray(v) for k, v in hb._asdict().items()}
    batch["advantages"] = jnp.asarray(rng.normal(size=hb.inputs.shape[:2]), jnp.float32)
    return batch


def test_kl_exactly_zero_at_step_0_in_bf16_at_a_temperature():
    """bf16 compute, fp32 master weights (the CPU GRPO configs), T = 0.8, two micro-batches, one and two
    updates: the reference pass is numerically the policy pass at step 0, so KL is exactly 0 (not
    rounding noise the penalty would pull towards) and the first update's ratio exactly 1 per token."""
    import dataclasses

    from emajax.models.decoder import Decoder

    cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="float32")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx, schedule = make_optimizer(OptimCfg(lr=1e-2, warmup_steps=0), 10)
    batch = _rollout_batch()
    for mu in (1, 2):
        model = Decoder(cfg, rngs=nnx.Rngs(2), lora=LoraConfig(rank=8, alpha=16.0, rslora=True, dtype=None))
        graphdef, state = create_state(model, lora=True, tx=tx, mesh=mesh, need_ref=True)
        spec = RlStepSpec(lora=True, log_kl=True, kl_weight=0.1, temperature=0.8, inner_updates=mu)
        new_state, m = compile_rl_step(graphdef, spec, tx, schedule, state, mesh)(state, batch)
        assert int(new_state.step) == mu
        if mu == 1:
            assert float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0
        else:  # metrics average the updates: the second one moved the policy
            assert float(m["kl"]) > 0.0


def test_steered_decoding_matches_the_steered_decoder():
    model = tiny_model(lora=LORA, seed=3)
    steer = _steer(6.0)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 250, size=(2, 11)), jnp.int32)

    @nnx.jit
    def logits(model, steer_ld):
        ref = model.logits(model(ids, steer_ld=steer_ld).hidden_btd)[:, -1]
        w = decode_weights(model)._replace(steer_ld=steer_ld)
        pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
        got, _ = forward_cached(TINY, w, ids, pos, jnp.ones((2, 11), bool), 0, DecodeCache.init(TINY, 2, 16))
        return ref, got

    ref, got = logits(model, steer)
    plain, _ = logits(model, jnp.zeros_like(steer))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(ref - plain))) > 1e-2  # the vector changes the logits at all


def test_nucleus_sampling_keeps_the_top_p_set_with_its_probabilities():
    from emajax.generate import _pick_token

    p = np.array([0.04, 0.5, 0.06, 0.25, 0.15], np.float32)  # top_p 0.8 keeps 0.5, 0.25, 0.15
    logits = jnp.asarray(np.tile(np.log(p), (20000, 1)))
    toks = np.asarray(jax.jit(_pick_token)(logits, jnp.float32(1.0), jnp.float32(0.8), jax.random.key(0)))
    freq = np.bincount(toks, minlength=5) / len(toks)
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3, 4]], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.015)
    # top_p = 1 keeps everything (categorical over the whole vocabulary)
    toks = np.asarray(jax.jit(_pick_token)(logits, jnp.float32(1.0), jnp.float32(1.0), jax.random.key(1)))
    np.testing.assert_allclose(np.bincount(toks, minlength=5) / len(toks), p, atol=0.015)


def test_mask_truncated_completions_leaves_them_no_loss_tokens():
    """TRL's mask_truncated_completions: a completion that hit max_new_tokens without a stop token keeps
    its row (it counts in its group's advantage) but has no loss tokens; `grpo` then averages over all rows."""
    from emajax.rl.loss import loss_weights
    from emajax.rl.rollout import truncated

    comps = [[5, 6, 257], [5, 6, 7], [5], [8, 9, 10]]  # max_new_tokens 3, stop 257: rows 1 and 3 are cut off
    cut = truncated(comps, [257], 3)
    assert cut.tolist() == [False, True, False, True]
    prompts = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    hb = update_batch(prompts, comps, group_size=2, micro_batch=2, min_bucket=16, max_len=64, pad_id=257, no_loss=cut)
    per_row = np.asarray(hb.loss_mask).reshape(4, -1).sum(1)
    assert per_row.tolist() == [3, 0, 1, 0]
    w = np.asarray(loss_weights(jnp.asarray(hb.loss_mask), "grpo")).reshape(4, -1)
    np.testing.assert_allclose(w.sum(1), [0.25, 0.0, 0.25, 0.0], rtol=1e-6)  # each kept row 1/4 of all rows
