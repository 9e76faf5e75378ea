"""The memory arena on real encoders: recorded lifetimes, exact outputs, bounded chunk allocations."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.arena import Arena, FreshWorkspace, record_lifetimes, token_bucket
from kernels.memory_plan import check_plan
from models.config import EncoderConfig
from models.encoder import PackedBatch, PackedEncoder


def _tiny(model_type: str, activation: str, layers: int = 2, hidden: int = 48) -> PackedEncoder:
    cfg = EncoderConfig(model_type=model_type, vocab_size=500, hidden_size=hidden, num_heads=4, num_layers=layers,
                        intermediate_size=2 * hidden + 8, max_positions=520, type_vocab_size=0 if model_type == "distilbert" else 2,
                        layer_norm_eps=1e-12, activation=activation, position_offset=2 if model_type == "roberta" else 0)
    torch.manual_seed(0)
    model = PackedEncoder(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _batch(rng: random.Random, model: PackedEncoder, lengths: list[int]) -> PackedBatch:
    seqs = [[rng.randrange(5, model.cfg.vocab_size) for _ in range(n)] for n in lengths]
    return PackedBatch.from_ids(seqs, model.cfg.position_offset)


MODELS = [("bert", "gelu"), ("bert", "gelu_new"), ("roberta", "gelu"), ("distilbert", "relu"), ("bert", "silu")]


@pytest.mark.parametrize("kind,act", MODELS)
@torch.inference_mode()
def test_arena_outputs_equal_fresh_outputs_exactly(kind, act):
    model = _tiny(kind, act)
    arena = Arena(record_lifetimes(model.record_forward), "cpu", min_chunk=4096, release_after=4)
    rng = random.Random(7)
    for _ in range(12):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 9))]
        batch = _batch(rng, model, lengths)
        want = model(batch, FreshWorkspace())
        with arena.batch(batch.input_ids.shape[0]) as ws:
            got = model(batch, ws).clone()
        assert torch.equal(got, want)  # same kernels, same order: bit for bit


@pytest.mark.parametrize("kind,act", MODELS[:1] + MODELS[2:4])
@torch.inference_mode()
def test_recorded_lifetimes_give_valid_plans(kind, act):
    model = _tiny(kind, act, layers=3)
    life = record_lifetimes(model.record_forward)
    hidden = model.cfg.hidden_size
    # Per layer: qkv, ctx, projection, LN out + stats, inner, projection, LN out + stats; plus the embeddings'.
    assert len(life) == 4 + 3 * 9
    assert all(a > 0 for a in life.per_token)
    assert 4 * 3 * hidden in life.per_token  # the fused QKV output, fp32
    arena = Arena(life, "cpu")
    for tokens in (1, 17, 300, 4096, 16384):
        plan = arena.plan(tokens)
        check_plan(plan, life.first, life.last)
        assert plan.sizes == [s + (-s) % 256 for s in life.sizes(token_bucket(tokens))]
        # Greedy-by-size lands within 5% of the lower bound (both on the bucket's shape) on these models.
        assert plan.peak_bytes <= 1.05 * life.lower_bound(token_bucket(tokens))


def test_record_refuses_a_forward_whose_sizes_are_not_linear():
    def squares(ws, tokens):
        x = ws.empty((tokens, tokens), torch.float32, torch.device("cpu"))
        return x.fill_(1.0)

    with pytest.raises(ValueError, match="not linear"):
        record_lifetimes(squares)

    def grows(ws, tokens):
        out = ws.empty((tokens,), torch.float32, torch.device("cpu")).zero_()
        for _ in range(tokens // 5):
            out = out + ws.empty((tokens,), torch.float32, torch.device("cpu")).zero_()
        return out

    with pytest.raises(ValueError, match="changes with the token count"):
        record_lifetimes(grows)


@torch.inference_mode()
def test_workspace_mismatch_is_an_error_not_corruption():
    model = _tiny("bert", "gelu")
    arena = Arena(record_lifetimes(model.record_forward), "cpu")
    with pytest.raises(RuntimeError, match="needs"), arena.batch(16) as ws:
        ws.empty((10_000, 1000), torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="more intermediates"), arena.batch(16) as ws:
        for _ in range(len(arena.lifetimes) + 1):
            ws.empty((1,), torch.float32, torch.device("cpu"))


@torch.inference_mode()
def test_long_variable_length_trace_allocates_a_bounded_number_of_chunks():
    model = _tiny("bert", "gelu", layers=2, hidden=64)
    arena = Arena(record_lifetimes(model.record_forward), "cpu", min_chunk=64 << 10, release_after=50)
    rng = random.Random(11)
    shapes = [[rng.randint(1, 128) for _ in range(rng.randint(1, 16))] for _ in range(40)]
    first_pass = None
    for round_ in range(3):  # the same 40 shapes, three times over
        for lengths in shapes:
            batch = _batch(rng, model, lengths)
            with arena.batch(batch.input_ids.shape[0]) as ws:
                model(batch, ws)
        if round_ == 0:
            first_pass = (arena.stats.chunk_allocations, arena.stats.plan_misses)
    # Chunks grow only while bigger batches than any before arrive, a handful in all ...
    assert first_pass[0] <= 8
    # ... and once every shape's plan is cached and the chunk set settled, nothing is allocated.
    before = (arena.stats.chunk_allocations, arena.stats.plan_misses)
    for lengths in shapes:
        batch = _batch(rng, model, lengths)
        with arena.batch(batch.input_ids.shape[0]) as ws:
            model(batch, ws)
    assert (arena.stats.chunk_allocations, arena.stats.plan_misses) == before
    assert arena.stats.plan_hits >= len(shapes)


@torch.inference_mode()
def test_arena_grows_to_the_largest_batch_and_shrinks_when_it_stops_coming():
    model = _tiny("bert", "gelu")
    arena = Arena(record_lifetimes(model.record_forward), "cpu", min_chunk=4096, release_after=3)
    rng = random.Random(1)
    reserved, allocations = [], []
    for lengths in ([5], [400, 400], [50], [400, 400], [5], [5], [5], [5], [5]):
        batch = _batch(rng, model, lengths)
        with arena.batch(batch.input_ids.shape[0]) as ws:
            model(batch, ws)
        reserved.append(arena.reserved_bytes)
        allocations.append(arena.stats.chunk_allocations)
    life = arena.lifetimes
    # The big batch replaced the small chunk by one that fits its plan; the batch of 50 tokens and the
    # second big one used that chunk as it was.
    assert reserved[1] > reserved[0] and reserved[1] == reserved[2] == reserved[3]
    assert reserved[1] <= 1.05 * life.lower_bound(token_bucket(800))
    assert allocations[:4] == [1, 2, 2, 2]
    # Three small batches in a row touched under half of it: it was given back and re-planned small.
    assert reserved[-1] < reserved[3] / 2 and arena.stats.chunk_releases >= 2 and allocations[-1] == 3
    # Grown and shrunk again and again, the arena's list of chunks (scanned every batch) holds only live ones.
    for _ in range(5):
        for lengths in ([400, 400], [5], [5], [5], [5]):
            batch = _batch(rng, model, lengths)
            with arena.batch(batch.input_ids.shape[0]) as ws:
                model(batch, ws)
    assert arena.stats.chunk_allocations >= 10 and len(arena._chunks) <= 2
    assert all(c is not None for c in arena._chunks)


def test_token_buckets_are_tight_and_monotonic():
    prev = 0
    for tokens in range(1, 20_000, 7):
        b = token_bucket(tokens)
        assert b >= tokens and b >= prev and b - tokens < max(16, tokens / 32)
        prev = b


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_arena_on_gpu_matches_planless_and_allocates_nothing_when_warm(dtype):
    model = _tiny("bert", "gelu", hidden=64).to("cuda", dtype)
    arena = Arena(record_lifetimes(model.record_forward), "cuda", min_chunk=1 << 20)
    rng = random.Random(3)
    shapes = [[rng.randint(1, 300) for _ in range(rng.randint(1, 12))] for _ in range(20)]
    for lengths in shapes + shapes:
        batch = _batch(rng, model, lengths)
        batch = PackedBatch(batch.input_ids.cuda(), batch.position_ids.cuda(), batch.cu_seqlens, batch.seq_index.cuda())
        want = model(batch, FreshWorkspace())
        with arena.batch(batch.input_ids.shape[0]) as ws:
            got = model(batch, ws).clone()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    warm = arena.stats.chunk_allocations
    for lengths in shapes:
        batch = _batch(rng, model, lengths)
        batch = PackedBatch(batch.input_ids.cuda(), batch.position_ids.cuda(), batch.cu_seqlens, batch.seq_index.cuda())
        with arena.batch(batch.input_ids.shape[0]) as ws:
            model(batch, ws)
    assert arena.stats.chunk_allocations == warm


@torch.inference_mode()
def test_a_failed_chunk_allocation_leaves_the_arena_usable(monkeypatch):
    model = _tiny("bert", "gelu")
    arena = Arena(record_lifetimes(model.record_forward), "cpu", min_chunk=4096)
    rng = random.Random(2)
    small, big = _batch(rng, model, [20]), _batch(rng, model, [300, 300])
    with arena.batch(20) as ws:
        model(small, ws)
    real_empty = torch.empty

    def no_memory(*args, **kwargs):
        if kwargs.get("dtype") is torch.uint8:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(torch.OutOfMemoryError), arena.batch(600) as ws:
        model(big, ws)
    monkeypatch.setattr(torch, "empty", real_empty)
    for batch in (small, big):  # both plan again and run, with the same outputs as without the arena
        with arena.batch(batch.input_ids.shape[0]) as ws:
            assert torch.equal(model(batch, ws), model(batch, FreshWorkspace()))
