"""Per-device memory of the compiled train step falls with the mesh (XLA's memory_analysis, abstract
shapes: deterministic, nothing is run). Goal (issue 17): at fsdp = N, per-device bytes within 1.25x of
(1-device bytes) / N + the largest weight gathered whole. The test fails when activations are not pinned
to their batch rows (emajax.losses.rows.constrain_rows): XLA then runs every layer on the whole batch
with the weights' model dimension split, well past the goal at fsdp=4 and 8."""

from __future__ import annotations

import pytest

from bench.memory import GOAL_RATIO, gathered_bytes, scaling_ratio, step_memory
from emajax.models.config import DecoderConfig

# Small enough to compile in seconds, large enough that activations (which must split over the batch)
# dominate the weights.
CFG = DecoderConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, eos_token_ids=(2,),
                    pad_token_id=0, tie_word_embeddings=True)


@pytest.mark.devices(8)
@pytest.mark.parametrize("lora,n", [(True, 4), (False, 8)], ids=["lora-fsdp4", "full-fsdp8"])
def test_step_memory_per_device_divides_by_the_mesh(lora, n):
    kw = dict(lora=lora, batch=8, seq=128, rank=8)
    one, many = step_memory(CFG, fsdp=1, **kw), step_memory(CFG, fsdp=n, **kw)
    ratio = scaling_ratio(one["device_bytes"], many["device_bytes"], n, gathered_bytes(CFG))
    assert ratio <= GOAL_RATIO, (f"fsdp={n}: {many['device_bytes']:,} bytes per device vs {one['device_bytes']:,} on one "
                                 f"device: {ratio:.2f}x the ideal")
    assert many["argument_bytes"] < one["argument_bytes"] / n * 1.5  # the state itself is sharded
