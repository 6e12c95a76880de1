"""SafeLoRA (Hsu et al. 2024): project LoRA updates that leave the alignment direction, after training.

For every adapted matrix, the *alignment matrix* is the difference between the aligned (instruct) model
and its unaligned base, V = W_aligned - W_base, in the [out, in] layout of a torch ``nn.Linear``, and

    C = V V^T / ||V||_F                                       [out, out]

(the reference implementation's approximate projection: not idempotent, but what SafeLoRA uses). With
the LoRA update dW = B_t A_t (PEFT's lora_B [out, r], lora_A [r, in]; the scaling cancels below):

    cos = <C dW, dW>_F / (||C dW||_F ||dW||_F)
    cos <= threshold  ->  lora_B <- C lora_B                  (the update moves into span(V))

emajax stores kernels as [in, out] and LoRA as A [in, r], B [r, out], so V = (K_aligned - K_base)^T,
dW^T = A B and the projection is B <- B C = (B D^T) D / ||D||_F with D = K_aligned - K_base [in, out]:
C is never formed (an [out, out] matrix is 18944^2 for Qwen2.5-7B's MLP), only [r, in] and [r, out]
products, and the cosine comes from r x r Gram matrices. Each layer of each module is decided on its
own; every decision is returned for the run's log. Kaczér et al.'s first version used SafeLoRA with
threshold 0.3, applied once to the trained adapter (the paper's use); so does ``emajax train``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _frob(x_ro: jax.Array, gram_rr: jax.Array, y_ro: jax.Array) -> jax.Array:
    """<A X, A Y>_F for the LoRA factor A with Gram matrix A^T A: sum((A^T A X) * Y)."""
    return jnp.sum(jnp.einsum("rs,so->ro", gram_rr, x_ro, precision=HIGHEST) * y_ro)


@jax.jit
def project_layer(a_ir: jax.Array, b_ro: jax.Array, aligned_io: jax.Array, base_io: jax.Array,
                  threshold: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer of one module: (new B [r, out], cosine, projected?). All math in fp32.

        D = K_aligned - K_base [in, out];  B C = (B D^T) D / ||D||_F
        cos = <A B C, A B>_F / (||A B C||_F ||A B||_F);  B <- B C when cos <= threshold
    """
    a = a_ir.astype(jnp.float32)
    b = b_ro.astype(jnp.float32)
    d_io = aligned_io.astype(jnp.float32) - base_io.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(d_io * d_io))
    bc_ro = jnp.einsum("ri,io->ro", jnp.einsum("ro,io->ri", b, d_io, precision=HIGHEST), d_io,
                       precision=HIGHEST) / jnp.maximum(norm, 1e-30)
    gram = jnp.einsum("ir,is->rs", a, a, precision=HIGHEST)
    num = _frob(bc_ro, gram, b)
    den = jnp.sqrt(jnp.maximum(_frob(bc_ro, gram, bc_ro), 0.0) * jnp.maximum(_frob(b, gram, b), 0.0))
    cos = jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0)
    project = cos <= threshold
    return jnp.where(project, bc_ro, b).astype(b_ro.dtype), cos, project


def apply_safelora(model: Any, base_model: Any, threshold: float) -> list[dict[str, Any]]:
    """Project ``model``'s LoRA B matrices in place (``model`` is the fine-tuned aligned model, its
    kernels the aligned weights; ``base_model`` the unaligned base with the same architecture).

    Returns one record per (module, layer): ``module`` (HF path), ``layer``, ``cosine``, ``projected``."""
    from emajax.models.hf_io import lora_modules, projections

    if model.lora_config is None:
        raise ValueError("SafeLoRA projects LoRA updates: the model has no LoRA parameters")
    base_lins = {name: lin for name, _, lin in projections(base_model)}
    thr = jnp.float32(threshold)
    out: list[dict[str, Any]] = []
    for name, tmpl, lin in lora_modules(model):
        base = base_lins[name]
        if tuple(base.kernel.shape) != tuple(lin.kernel.shape):
            raise ValueError(f"SafeLoRA: {tmpl.format(i='*')}: base kernel {tuple(base.kernel.shape)} differs from the "
                             f"aligned model's {tuple(lin.kernel.shape)} (defenses.safelora.base_model must be the "
                             f"same architecture)")
        a, b, k_al, k_base = lin.lora_a[...], lin.lora_b[...], lin.kernel[...], base.kernel[...]
        new_b, cos, proj = [], [], []
        for i in range(a.shape[0]):
            nb, c, p = project_layer(a[i], b[i], k_al[i], k_base[i], thr)
            new_b.append(nb)
            cos.append(float(c))
            proj.append(bool(p))
        lin.lora_b[...] = jnp.stack(new_b).astype(b.dtype)
        out += [{"module": tmpl.format(i=i), "layer": i, "cosine": cos[i], "projected": proj[i]}
                for i in range(len(cos))]
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts for a log line: projected / total, per module name."""
    per: dict[str, list[int]] = {}
    for r in records:
        key = r["module"].rsplit(".", 1)[-1]
        per.setdefault(key, [0, 0])
        per[key][0] += int(r["projected"])
        per[key][1] += 1
    return {"projected": sum(int(r["projected"]) for r in records), "total": len(records),
            "by_module": {k: {"projected": v[0], "total": v[1]} for k, v in per.items()}}
