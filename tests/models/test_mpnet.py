"""MPNet (all-mpnet-base-v2's architecture) against transformers and sentence-transformers on a small seeded random
model (tests/mpnet_folders.py): the packed forward with its relative position bias, including sequences past 128
tokens where the buckets saturate; the start-up folder check; the CUDA code path on the CPU emulator; /embed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import cuda, emulate
from kernels.attention import DeviceLayout, varlen_attention
from models.checks import check_model_settings
from models.config import EncoderConfig, ModelFolderError
from models.encoder import PackedBatch, PackedEncoder
from models.folder import read_model_folder
from models.relative_bias import relative_position_bucket
from models.runtime import finish_embedding, load_model
from models.weights import load_encoder
from server.app import create_app
from tests.mpnet_folders import mpnet_folder, texts
from tests.support import ServerThread, settings, worst_per_sequence

LENGTHS = (1, 5, 37, 130, 200, 300)  # in tokens, with <s> and </s>; past 128 the distance buckets saturate


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return mpnet_folder(tmp_path_factory.mktemp("mpnet"))


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    """Token ids between <s> and </s>; the last sequence holds the padding id 1, which takes the padding's position."""
    rng = np.random.default_rng(seed)
    seqs = [[0, *rng.integers(4, 90, size=max(n - 2, 0)).tolist(), 2][:n] for n in lengths]
    seqs[-1][10] = 1
    return seqs


def _ours(folder, seqs, dtype=torch.float32, emulated: bool = False) -> torch.Tensor:
    enc = read_model_folder(folder).encoder
    model = load_encoder(enc, read_model_folder(folder).weights).to(dtype=dtype)
    batch = PackedBatch.from_ids(seqs, enc.position_offset)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(batch).float()


def _transformers(folder, seqs) -> list[torch.Tensor]:
    from tests.hf_import import import_transformers  # noqa: PLC0415

    model = import_transformers().MPNetModel.from_pretrained(str(folder)).eval()
    width = max(map(len, seqs))
    ids = torch.tensor([s + [1] * (width - len(s)) for s in seqs])  # right padding with <pad>
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [hidden[i, :len(s)] for i, s in enumerate(seqs)]


def test_config_parses_mpnet(folder):
    enc = read_model_folder(folder).encoder
    assert (enc.model_type, enc.type_vocab_size, enc.position_offset, enc.relative_attention_buckets) == ("mpnet", 0, 2, 32)
    assert enc.max_input_length == 512
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="relative_attention_num_buckets=16"):
        EncoderConfig.from_dict({**cfg, "relative_attention_num_buckets": 16})


def test_buckets_match_transformers():
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    rel = torch.arange(-600, 601)[None, :]
    want = tf.models.mpnet.modeling_mpnet.MPNetEncoder.relative_position_bucket(rel)
    assert torch.equal(relative_position_bucket(rel), want)


def test_packed_forward_matches_transformers(folder):
    seqs = _sequences()
    ours = _ours(folder, seqs)
    ref = _transformers(folder, seqs)
    worst = worst_per_sequence(ours, ref, seqs)
    assert worst <= 1e-5, worst
    # the bias matters here: without it the states are far off
    model = load_encoder(read_model_folder(folder).encoder, read_model_folder(folder).weights)
    model.relative_attention_bias.weight.data.zero_()
    with torch.inference_mode():
        unbiased = model(PackedBatch.from_ids(seqs, 2))
    assert worst_per_sequence(unbiased, ref, seqs) > 1e-2


def test_sentence_transformers_folder_served_as_encode_gives(folder):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((0, 3, 20, 140, 260))
    want = SentenceTransformer(str(folder), device="cpu").encode(sample)
    embedder, tokenizer, info = load_model(str(folder))  # with the memory arena, as served
    ids = [e.ids for e in tokenizer.encode(sample, truncate=True)]
    assert ids[0] == [0, 2] and max(map(len, ids)) == 262
    got = finish_embedding(embedder.embed(ids), info.normalize)
    assert info.model_type == "mpnet" and info.normalize and info.max_input_length == 512
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.99999, cosine


def test_weights_with_the_mpnet_prefix_load(folder, tmp_path):
    other = tmp_path / "prefixed"
    shutil.copytree(folder, other)
    tensors = load_file(str(other / "model.safetensors"))
    save_file({f"mpnet.{k}": v for k, v in tensors.items()}, str(other / "model.safetensors"))
    seqs = _sequences((3, 140))
    assert torch.equal(_ours(other, seqs), _ours(folder, seqs))


@pytest.mark.parametrize("case", ["missing", "wrong shape"])
def test_folder_check_refuses_a_bad_relative_attention_bias(folder, tmp_path, case):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "encoder.relative_attention_bias.weight"
    if case == "missing":
        del tensors[name]
        needle = f"weight '{name}' is missing from model.safetensors"
    else:
        tensors[name] = tensors[name][:, :3].contiguous()
        needle = r"relative_attention_bias.weight is \[32, 3\] in the files, \[32, 4\] by config.json"
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=needle):
        check_model_settings(read_model_folder(bad), "cpu", "float32")


def test_attention_bias_on_every_offsets_form():
    """varlen_attention with a bias: each sequence gets its top-left block, host offsets or device ones alike."""
    g = torch.Generator().manual_seed(0)
    cu = [0, 3, 10, 10 + 17]
    q, k, v = (torch.randn(cu[-1], 2, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 20, 20, generator=g)
    want = torch.empty(cu[-1], 16)
    for s, e in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / 8 ** 0.5 + bias[:, :e - s, :e - s]
        want[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e]).reshape(e - s, 16)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, attn_bias=bias), want, atol=1e-5, rtol=1e-5)
    layout = DeviceLayout(torch.tensor(cu, dtype=torch.int32), 20)
    torch.testing.assert_close(varlen_attention(q, k, v, layout, attn_bias=bias), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_bias must be"):
        varlen_attention(q, k, v, cu, attn_bias=bias[:, :10, :10])


def test_models_without_a_relative_bias_keep_their_parameters():
    cfg = EncoderConfig("bert", 100, 64, 4, 2, 128, 64, 2, 1e-12, "gelu")
    model = PackedEncoder(cfg)
    assert model.relative_attention_bias is None
    assert not any("relative" in name for name in model.state_dict())


def test_cuda_graphs_are_not_captured_for_mpnet(folder):
    from models.graphs import GraphedForward  # noqa: PLC0415

    embedder, _, _ = load_model(str(folder), memory_arena=False)
    assert embedder.capture_graphs(64, 4) is False and embedder.graphs is None
    with pytest.raises(ValueError, match="relative position bias"):
        GraphedForward(embedder.encoder, "mean", None, 2, False, 64, 4, torch.device("cpu"), embedder._eager)


@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_code_path_on_the_emulator_matches_the_cpu_path(folder, dtype):
    """The CUDA code path (fused kernels; attention with the bias one sequence at a time) run by the CPU emulator, in
    the GPU's dtypes too (each token's state against the CPU path's fp32 one)."""
    seqs = _sequences((1, 9, 140))
    before = emulate.launches.copy()
    got = _ours(folder, seqs, dtype, emulated=True)
    assert sum((emulate.launches - before).values()) > 0  # the kernels ran, not the CPU path
    want = _ours(folder, seqs)
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= 1e-5
        assert worst_per_sequence(got, _transformers(folder, seqs), seqs) <= 1e-5
    else:
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
        assert cosine.min().item() >= 0.9999, cosine.min()


def test_embed_over_http(folder):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((4, 150))
    app_settings = settings(model={"path": str(folder), "name": "mpnet"})
    with ServerThread(create_app(app_settings)) as s, s.client() as c:
        r = c.post("/embed", json={"inputs": sample})
        info = c.get("/info").json()
    assert r.status_code == 200, r.text
    want = SentenceTransformer(str(folder), device="cpu").encode(sample)
    np.testing.assert_allclose(np.array(r.json()), want, atol=2e-5)
    assert info["model_id"] == "mpnet"
