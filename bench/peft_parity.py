"""``python -m bench.peft_parity``: a trained emajax adapter against HF transformers + PEFT (the oracle).

Answers two checks with one adapter directory written by ``emajax train`` (``RUN/export``):

* logits: the base model with the adapter applied in emajax (``load_peft_adapter``) vs
  ``PeftModel.from_pretrained`` in transformers, on a right-padded batch of real chats (fp32):
  max relative error over the real tokens and argmax agreement;
* scoring: the per-example mean answer-token NLL of ``emajax score`` (``Scorer`` over the same adapter)
  vs the same quantity from the PEFT model, one unpadded chat at a time in float64 log-softmax.

    python -m bench.peft_parity --adapter runs/medical-probe/runs/none/export \
        --data ../shared/data/em/sft/medical_misaligned_eval.jsonl --n 100 \
        --out bench/results/peft_parity_smollm2_medical.json

torch/PEFT are test-and-bench-only dependencies; the library never imports them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _chats(path: Path, n: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["messages"] for r in rows[:n]]


def run(adapter: Path, base: str, data: Path, n: int, max_len: int, batch: int) -> dict[str, Any]:
    import jax.numpy as jnp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emajax.batching import pad_batch
    from emajax.chat import encode_chat
    from emajax.models.hf_io import load_peft_adapter, peft_lora_config
    from emajax.models.hub import load_model
    from emajax.scoring.adapters import parse_model_spec
    from emajax.scoring.score import Scorer, score_pool
    from emajax.scoring.shards import read_scores

    t0 = time.perf_counter()
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    loaded = load_model(base)
    tok = loaded.tokenizer
    chats = _chats(data, n)
    enc = [encode_chat(tok, c, max_len=max_len) for c in chats]

    hf = AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(adapter)).eval()
    ours = load_peft_adapter(load_model(base, lora=peft_lora_config(adapter)).model, adapter)

    # 1) logits on right-padded batches
    max_rel, agree, total = 0.0, 0, 0
    for i in range(0, len(enc), batch):
        part = [e.ids for e in enc[i:i + batch]]
        ids_bt, mask_bt, pos_bt = pad_batch(part, pad_id=0, length=max(len(x) for x in part))
        mask_bt = np.asarray(mask_bt).astype(bool)
        out = ours(jnp.asarray(ids_bt), attn_mask_bt=jnp.asarray(mask_bt), positions_bt=jnp.asarray(pos_bt))
        mine = np.asarray(ours.logits(out.hidden_btd), np.float64)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids_bt).long(), attention_mask=torch.tensor(mask_bt).long()).logits
        ref = ref.double().numpy()
        m = mask_bt
        scale = np.abs(ref[m]).max()
        max_rel = max(max_rel, float(np.abs(mine[m] - ref[m]).max() / scale))
        agree += int((mine[m].argmax(-1) == ref[m].argmax(-1)).sum())
        total += int(m.sum())

    # 2) emajax score vs the oracle, per example
    oracle = []
    for e in enc:
        ids = torch.tensor([e.ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
        nll = -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()
        oracle.append(float(nll[np.asarray(e.answer_mask[1:], bool)].mean()))
    oracle_n = np.asarray(oracle)
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        pool.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
        sc = Scorer(loaded, [parse_model_spec(f"trained={adapter}")])
        score_pool(sc, pool, Path(tmp) / "out", max_len=max_len, progress=False)
        cols = read_scores(Path(tmp) / "out")
    order = np.argsort(np.asarray(cols["index"]))
    mine_n = np.asarray(cols["nll_misaligned"], np.float64)[order][:, 0]
    aligned_n = np.asarray(cols["nll_aligned"], np.float64)[order]
    rel_n = np.abs(mine_n - oracle_n) / np.abs(oracle_n)
    from emajax.eval.stats import summarize

    return {
        "adapter": str(adapter), "base": base, "data": str(data), "n_chats": len(chats), "max_len": max_len,
        "adapter_config": {k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")},
        "logits_max_rel_err": max_rel, "logits_argmax_agreement": agree / total, "logit_tokens": total,
        "score_nll_max_rel_err": float(rel_n.max()), "score_nll_mean_rel_err": float(rel_n.mean()),
        "mean_nll_adapter_emajax": float(mine_n.mean()), "mean_nll_adapter_oracle": float(oracle_n.mean()),
        "mean_nll_base_emajax": float(aligned_n.mean()),
        # held-out answer NLL, adapter - base, paired per chat, with a 95% bootstrap CI
        "nll_change_vs_base": summarize(mine_n - aligned_n), "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peft_parity", description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, type=Path, help="PEFT adapter dir (emajax train's RUN/export)")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--data", required=True, type=Path, help="chat JSONL (messages)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    res = run(a.adapter, a.base, a.data, a.n, a.max_len, a.batch)
    print(json.dumps(res, indent=1))
    if a.out:
        from emajax.atomic import write_json

        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
