"""The whole encoder on a GPU in fp16/bf16 against the CPU fp32 model on the same weights (skipped
without a GPU). Weights are seeded random, built from a config: nothing is downloaded."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from models.config import EncoderConfig
from models.encoder import PackedBatch, PackedEncoder, pool

pytestmark = pytest.mark.gpu

CONFIGS = {
    "minilm-l6": dict(hidden_size=384, num_heads=12, num_layers=6, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_heads=12, num_layers=12, intermediate_size=3072),
}


def random_encoder(name: str, seed: int = 0) -> PackedEncoder:
    cfg = EncoderConfig("bert", 30522, max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
                        **CONFIGS[name])
    torch.manual_seed(seed)
    model = PackedEncoder(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for layer in model.layers:  # LayerNorm scales near 1, as trained models have them
        layer.attn_norm.weight.data.add_(1.0)
        layer.ffn_norm.weight.data.add_(1.0)
    model.embed_norm.weight.data.add_(1.0)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpu_encoder_matches_cpu_fp32(name, dtype):
    cpu = random_encoder(name)
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    rng = random.Random(1)
    seqs = [[rng.randint(1000, 29000) for _ in range(n)] for n in (1, 8, 77, 128, 300, 512, 33)]
    with torch.inference_mode():
        ref = pool(cpu(PackedBatch.from_ids(seqs, 0)), PackedBatch.from_ids(seqs, 0), "mean").numpy()
        batch = PackedBatch.from_ids(seqs, 0, "cuda")
        got = pool(gpu(batch), batch, "mean").cpu().numpy()
    cosine = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.999, cosine
