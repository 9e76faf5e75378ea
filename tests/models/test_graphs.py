"""CUDA graphs of the forward (models/graphs.py). On the CPU, the buckets' padded forward (the computation a graph
captures: padding tokens as one dummy sequence, empty slots, offsets read from the device) runs without a graph and
must give what the eager forward gives, for every pooling, a classifier head and text pairs. On a GPU (gpu marker)
the captured graphs replay it and must agree with the eager path, batch after batch."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import cuda, emulate
from kernels.attention import DeviceLayout, varlen_attention, varlen_attention_reference
from models.encoder import ClassificationHead
from models.graphs import GraphedForward, bucket_sizes, example_batch
from models.runtime import EncoderEmbedder
from tests.models.test_gpu_encoder import random_encoder

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def batches(seed: int, vocab: int = 30522) -> list[tuple[list[list[int]], list[int | None] | None]]:
    """Batches over the buckets' edges: one token, a bucket filled exactly, many short sequences, pairs."""
    rng = random.Random(seed)

    def seqs(lengths):
        return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]

    return [(seqs([1]), None), (seqs([32]), None), (seqs([5, 17, 9]), None), (seqs([3] * 16), None),
            (seqs([40, 1, 23, 60]), None), (seqs([96]), None), (seqs([7, 12, 30]), [3, None, 11])]


def graphed(embedder: EncoderEmbedder, max_tokens: int = 128, max_sequences: int = 16) -> GraphedForward:
    return GraphedForward(embedder.encoder, embedder.pooling, embedder.head, embedder.position_offset,
                          embedder.token_types, max_tokens, max_sequences, embedder.device, embedder._eager)


def test_bucket_sizes_step_by_at_most_half():
    sizes = bucket_sizes(2048)
    assert sizes[0] == 32 and sizes[-1] == 2048 and sizes == sorted(set(sizes))
    assert all(b / a <= 1.5 for a, b in zip(sizes, sizes[1:]))
    assert bucket_sizes(100)[-1] == 100 and bucket_sizes(10) == [10]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "head"])
def test_padded_forward_matches_the_eager_one_on_cpu(pooling):
    encoder = random_encoder("minilm-l6")
    head = None
    if pooling == "head":
        torch.manual_seed(3)
        head = ClassificationHead(encoder.cfg.hidden_size, 2).eval()
    embedder = EncoderEmbedder(encoder, "cls" if head else pooling, 0, torch.device("cpu"), head=head)
    graphs = graphed(embedder)
    for sequences, segments in batches(0):
        with torch.inference_mode():
            got = graphs.run(sequences, segments)
            want = embedder._eager(sequences, segments)
        assert got.shape == want.shape == (len(sequences), embedder.dim)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    assert graphs.stats.replays == len(batches(0)) and graphs.stats.eager == 0


def test_a_roberta_padding_id_inside_an_input_gets_the_eager_positions():
    """RoBERTa's positions skip a padding id (1, offset 2) inside an input: the bucket's staging does as the eager
    path (checked against transformers in test_parity)."""
    embedder = EncoderEmbedder(random_encoder("minilm-l6"), "mean", 2, torch.device("cpu"))
    graphs = graphed(embedder)
    sequences = [[0, 2000, 1, 3000, 1, 2], [0, 1, 1, 2], [0, 5000, 2]]
    with torch.inference_mode():
        got, want = graphs.run(sequences, None), embedder._eager(sequences, None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    plain = [[0, 2000, 3000, 2]]
    with torch.inference_mode():
        assert not np.allclose(graphs.run([[0, 2000, 1, 3000, 2]], None)[0], graphs.run(plain, None)[0], atol=1e-3)


def test_batches_no_bucket_fits_are_left_to_the_eager_path():
    embedder = EncoderEmbedder(random_encoder("minilm-l6"), "mean", 0, torch.device("cpu"))
    embedder.graphs = graphed(embedder, max_tokens=64, max_sequences=4)
    too_long, too_many = [[5] * 65], [[5]] * 5
    for sequences in (too_long, too_many):
        assert embedder.graphs.run(sequences) is None
        got = embedder.embed(sequences)  # answered eagerly all the same
        np.testing.assert_allclose(got, embedder._eager(sequences, None), rtol=1e-6)
    assert embedder.graphs.stats.eager == 4 and embedder.graphs.stats.replays == 0
    # the smallest bucket that holds a batch is the one it runs in
    assert embedder.graphs.bucket_for(3, 33).tokens == 48 and embedder.graphs.bucket_for(4, 64).tokens == 64
    assert embedder.graphs.bucket_for(5, 10) is None


def test_per_token_outputs_skip_the_graphs():
    embedder = EncoderEmbedder(random_encoder("minilm-l6"), "mean", 0, torch.device("cpu"))
    embedder.graphs = graphed(embedder)
    out = embedder.embed([[1, 2, 3], [4, 5]], per_token=[True, False])
    assert out[0].shape == (3, embedder.dim) and embedder.graphs.stats.replays == 0


@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
def test_padded_forward_on_the_cuda_code_path_of_the_emulator():
    """The kernels' path (CPU emulator) with a DeviceLayout: attention reads the offsets back for its per-sequence
    path, empty slots included, and the fused kernels run over the padding."""
    encoder = random_encoder("minilm-l6")
    embedder = EncoderEmbedder(copy.deepcopy(encoder), "mean", 0, torch.device("cpu"))
    graphs = graphed(embedder, max_tokens=48, max_sequences=8)
    sequences = batches(1)[2][0]
    with torch.inference_mode(), cuda.emulation():
        got = graphs.run(sequences)
    want = EncoderEmbedder(encoder, "mean", 0, torch.device("cpu"))._eager(sequences, None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_device_layout_attention_skips_empty_sequences_on_cpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = [0, 5, 5, 9, 9, 12]
    got = varlen_attention(q, k, v, DeviceLayout(torch.tensor(cu, dtype=torch.int32), 12))
    want = varlen_attention_reference(q, k, v, [0, 5, 9, 12])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, DeviceLayout(torch.tensor(cu), 12))


def test_example_batches_fill_three_quarters_of_a_bucket():
    rng = np.random.default_rng(0)
    embedder = EncoderEmbedder(random_encoder("minilm-l6"), "mean", 0, torch.device("cpu"))
    for bucket in graphed(embedder, max_tokens=512, max_sequences=2).buckets:
        example = example_batch(bucket, 100, rng)
        assert 1 <= len(example) <= bucket.slots and sum(map(len, example)) == bucket.tokens * 3 // 4
        assert all(len(s) >= 1 and max(s) < 100 for s in example)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pooling", ["mean", "cls", "head"])
def test_graphs_replay_what_the_eager_forward_computes_on_gpu(dtype, pooling):
    encoder = random_encoder("minilm-l6").to("cuda", dtype)
    head = None
    if pooling == "head":
        torch.manual_seed(3)
        head = ClassificationHead(encoder.cfg.hidden_size, 1).to("cuda", dtype).eval()
    embedder = EncoderEmbedder(encoder, "cls" if head else pooling, 0, torch.device("cuda"), head=head)
    assert embedder.capture_graphs(128, 16), embedder.graphs.stats.off_reason
    assert [t for t, _ in embedder.graphs.stats.buckets] == [128, 96, 64, 48, 32]
    for round_ in range(2):  # the same graphs again: nothing of a batch stays behind in them
        for sequences, segments in batches(round_):
            got = embedder.embed(sequences, segments=segments)
            want = embedder._eager(sequences, segments)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 2e-2 * scale, (len(sequences), np.abs(got - want).max() / scale)
    assert embedder.graphs.stats.replays == 2 * len(batches(0)) and embedder.graphs.stats.eager == 0


@pytest.mark.gpu
@gpu
def test_device_layout_flash_attention_with_empty_slots_on_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(64, 4, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    cu = [0, 5, 5, 30, 30, 30, 64]
    got = varlen_attention(q, k, v, DeviceLayout(torch.tensor(cu, dtype=torch.int32, device="cuda"), 64))
    want = varlen_attention_reference(q.float(), k.float(), v.float(), [0, 5, 30, 64])
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()


class _HostReads(TorchDispatchMode):
    """Notes every op that, on a GPU, reads a device value back to the host (which a CUDA graph capture forbids)."""

    READS = {"item", "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _flash_stand_in(q, k, v, cu, longest, out, causal=False, window=None):
    """FlashAttention's varlen contract computed from the device offsets alone: each token attends to the tokens of
    its own sequence (a block-diagonal mask from `cu`, no value read on the host)."""
    tokens = q.shape[0]
    seq = torch.searchsorted(cu.long(), torch.arange(tokens), right=True)  # [T] 1 + the sequence of each token
    mask = seq[:, None] == seq[None, :]
    ctx = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask).transpose(0, 1)
    flat = ctx.reshape(tokens, -1)
    return flat if out is None else out.copy_(flat)


@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
def test_a_buckets_forward_reads_nothing_back_to_the_host(monkeypatch):
    """What a capture records must not read a device value on the host. On the CPU, through the kernels' code path
    (the emulator) with attention taking the flash route (a stand-in computing its contract from the device offsets):
    the whole forward and pooling run without one host read, and give the eager answer."""
    import kernels.attention as attention  # noqa: PLC0415

    monkeypatch.setattr(attention, "flash_eligible", lambda q: True)
    monkeypatch.setattr(attention, "flash_agrees", lambda device, dtype, head_dim, causal=False, window=None: True)
    monkeypatch.setattr(attention, "_flash", _flash_stand_in)
    encoder = random_encoder("minilm-l6")
    reference = EncoderEmbedder(copy.deepcopy(encoder), "mean", 0, torch.device("cpu"))
    embedder = EncoderEmbedder(encoder, "mean", 0, torch.device("cpu"))
    graphs = graphed(embedder, max_tokens=48, max_sequences=8)
    sequences = batches(2)[2][0]
    bucket = graphs.bucket_for(len(sequences), sum(map(len, sequences)))
    bucket.stage(sequences, None, 0, 0)
    reads = _HostReads()
    with torch.inference_mode(), cuda.emulation(), reads:
        out = graphs.forward(bucket)
    assert reads.seen == []
    np.testing.assert_allclose(out[:len(sequences)].numpy(), reference._eager(sequences, None), rtol=1e-4, atol=2e-5)
    # and the mode sees what it looks for: a host read of a device value
    with torch.inference_mode(), reads:
        int(bucket.meta[0])
    assert reads.seen == ["item.default"]


class _ReplayOnCpu:
    """A stand-in for a captured graph on the CPU: a replay recomputes the bucket's forward into its output."""

    def __init__(self, graphs: GraphedForward, bucket):
        self.graphs, self.bucket = graphs, bucket

    def replay(self):
        self.bucket.out.copy_(self.graphs.forward(self.bucket))


def test_capture_drops_a_bucket_without_memory_and_turns_off_on_a_disagreement(monkeypatch):
    """capture()'s bookkeeping, the device part stood in for: the largest bucket out of memory is dropped (its batches
    run eagerly), the rest serve; a bucket that disagrees with the eager forward turns every graph off."""
    embedder = EncoderEmbedder(random_encoder("minilm-l6"), "mean", 0, torch.device("cpu"))
    graphs = graphed(embedder, max_tokens=96, max_sequences=8)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def capture_one(self, bucket, example, pool, tolerance):
        if bucket.tokens == 96:
            raise torch.cuda.OutOfMemoryError("stand-in")
        bucket.out = self.forward(bucket)
        bucket.graph = _ReplayOnCpu(self, bucket)
        self.stats.buckets.append((bucket.tokens, bucket.slots))

    monkeypatch.setattr(GraphedForward, "_capture", capture_one)
    assert graphs.capture(100) and graphs.on
    assert [b.tokens for b in graphs.buckets] == [32, 48, 64] and graphs.stats.replays == 0
    small, big = batches(3)[2][0], [[7] * 70]
    np.testing.assert_allclose(graphs.run(small), embedder._eager(small, None), rtol=1e-4, atol=2e-5)
    assert graphs.run(big) is None and graphs.stats.eager == 1  # no bucket holds it any more

    def disagree(self, bucket, example, pool, tolerance):
        raise RuntimeError(f"bucket of {bucket.tokens} tokens differs from the eager forward")

    monkeypatch.setattr(GraphedForward, "_capture", disagree)
    again = graphed(embedder, max_tokens=96, max_sequences=8)
    assert not again.capture(100) and not again.on and "differs" in again.stats.off_reason
    assert again.run(small) is None and again.info()["on"] is False
