"""SafeLoRA against a NumPy transcription of the reference algorithm (torch layout), on tiny random model pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import tiny_model  # noqa: E402

from emajax.defenses.safelora import apply_safelora  # noqa: E402
from emajax.models.hf_io import lora_modules, projections  # noqa: E402


def reference(lora_a_ri: np.ndarray, lora_b_or: np.ndarray, w_al_oi: np.ndarray, w_base_oi: np.ndarray,
              thr: float) -> tuple[np.ndarray, float, bool]:
    """SafeLoRA on PEFT / torch tensors: V = W_al - W_base [out, in], C = V V^T / ||V||_F,
    cos(C B A, B A) <= thr -> lora_B <- C lora_B."""
    v = (w_al_oi - w_base_oi).astype(np.float64)
    c = v @ v.T / np.linalg.norm(v)
    ba = lora_b_or.astype(np.float64) @ lora_a_ri
    cba = c @ ba
    cos = float((cba * ba).sum() / (np.linalg.norm(cba) * np.linalg.norm(ba)))
    return (c @ lora_b_or if cos <= thr else lora_b_or), cos, cos <= thr


def _pair(seed: int):
    """(aligned model with a random adapter, base model): the base differs by a low-rank change in some
    layers (update mostly inside span(V): high cosine) and by noise in others (low cosine)."""
    aligned = tiny_model(seed=seed)
    base = tiny_model(lora=None, seed=seed)
    rng = np.random.default_rng(seed)
    base_lins = {name: lin for name, _, lin in projections(base)}
    for name, _, lin in lora_modules(aligned):
        blin = base_lins[name]
        k = np.asarray(lin.kernel[...])
        lin.lora_a[...] = rng.normal(size=lin.lora_a.shape).astype(np.float32)
        lin.lora_b[...] = rng.normal(size=lin.lora_b.shape).astype(np.float32)
        d = rng.normal(size=k.shape).astype(np.float32)
        # half the layers: the alignment difference shares the adapter's output directions
        b = np.asarray(lin.lora_b[...])
        for i in range(0, k.shape[0], 2):
            d[i] = rng.normal(size=(k.shape[1], b.shape[1])) @ b[i] * 0.5 + 0.05 * d[i]
        blin.kernel[...] = k - d
    return aligned, base


def test_safelora_matches_numpy_reference_per_layer():
    aligned, base = _pair(0)
    before = {tmpl: (np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...]), np.asarray(lin.kernel[...]))
              for _, tmpl, lin in lora_modules(aligned)}
    base_lins = {name: lin for name, _, lin in projections(base)}
    base_k = {tmpl: np.asarray(base_lins[name].kernel[...]) for name, tmpl, _ in lora_modules(aligned)}
    # threshold at the median reference cosine: some layers are projected, some are not
    all_cos = [reference(a[i].T, b[i].T, k[i].T, base_k[t][i].T, 0.0)[1]
               for t, (a, b, k) in before.items() for i in range(a.shape[0])]
    thr = float(np.median(all_cos))
    records = apply_safelora(aligned, base, thr)
    assert len(records) == len(all_cos) and 0 < sum(r["projected"] for r in records) < len(records)
    by = {(r["module"], r["layer"]): r for r in records}
    for _, tmpl, lin in lora_modules(aligned):
        a, b, k = before[tmpl]
        got_b = np.asarray(lin.lora_b[...])
        for i in range(a.shape[0]):
            want_b_or, cos, proj = reference(a[i].T, b[i].T, k[i].T, base_k[tmpl][i].T, thr)
            rec = by[(tmpl.format(i=i), i)]
            assert rec["projected"] == proj
            np.testing.assert_allclose(rec["cosine"], cos, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got_b[i], want_b_or.T, rtol=1e-4, atol=1e-5)
            if not proj:
                np.testing.assert_array_equal(got_b[i], b[i])


def test_safelora_threshold_extremes():
    aligned, base = _pair(1)
    b0 = jax.tree.map(np.asarray, nnx.state(aligned, nnx.LoRAParam))
    assert not any(r["projected"] for r in apply_safelora(aligned, base, -1.0))  # cos > -1: nothing moves
    b1 = jax.tree.map(np.asarray, nnx.state(aligned, nnx.LoRAParam))
    for x, y in zip(jax.tree.leaves(b0), jax.tree.leaves(b1)):
        np.testing.assert_array_equal(x, y)
    assert all(r["projected"] for r in apply_safelora(aligned, base, 1.0))
