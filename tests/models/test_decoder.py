"""Decoder-only embedders (Qwen3-Embedding's and Qwen2's architectures) against transformers and sentence-transformers
on small seeded random models (tests/qwen_folders.py): the packed forward (grouped-query causal attention, rotary
positions, RMSNorm, gated feed-forward), bidirectional attention for custom code that asks for it, the config's
refusals, the folder check, and the server (prompts, truncation, the OpenAI client)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kernels import cuda, emulate
from kernels.attention import DeviceLayout, varlen_attention
from models.config import EncoderConfig, ModelFolderError
from models.decoder import PackedDecoder
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.runtime import load_model
from models.weights import load_encoder
from server.app import create_app
from tests.mpnet_folders import texts
from tests.qwen_folders import QUERY_PROMPT, qwen_folder
from tests.support import (
    ServerThread,
    bfloat16_cosine,
    causal_lm_copy,
    folder_check_refuses,
    settings,
    truncation_served_as_encode,
    worst_per_sequence,
)

LENGTHS = (1, 2, 9, 40, 131, 300)  # tokens, <|endoftext|> included


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {kind: qwen_folder(root, kind) for kind in ("qwen3", "qwen2")}


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(4, 70, size=n - 1).tolist(), 0] for n in lengths]


def _ours(folder, seqs, dtype=torch.float32, emulated: bool = False) -> torch.Tensor:
    parsed = read_model_folder(folder)
    model = load_encoder(parsed.encoder, parsed.weights).to(dtype=dtype)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(PackedBatch.from_ids(seqs, 0)).float()


def _transformers(folder, seqs, bidirectional: bool = False) -> list[torch.Tensor]:
    """Each sequence alone (no padding, no mask): with is_causal off on every attention module, transformers' SDPA
    attention is bidirectional."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    model = (tf.Qwen3Model if kind == "qwen3" else tf.Qwen2Model).from_pretrained(str(folder), attn_implementation="sdpa").eval()
    if bidirectional:
        for layer in model.layers:
            layer.self_attn.is_causal = False
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_packed_forward_matches_transformers(folders, kind):
    seqs = _sequences()
    ours = _ours(folders[kind], seqs)
    worst = worst_per_sequence(ours, _transformers(folders[kind], seqs), seqs)
    assert worst <= 2e-5, worst
    cfg = read_model_folder(folders[kind]).encoder
    assert cfg.decoder.qk_norm == (kind == "qwen3") and cfg.decoder.qkv_bias == (kind == "qwen2")
    assert cfg.num_heads // cfg.decoder.num_kv_heads == 2  # grouped-query attention is exercised


def test_the_decoder_runs_the_emulated_cuda_path_as_the_cpu_one(folders):
    """Under the CUDA emulator, causal attention leaves nested tensors aside: one SDPA call a sequence; every RMSNorm
    is the fused kernel's (2 layers: attention input, q and k, residual + feed-forward input; then the final one),
    scalar or packed as the weights' alignment allows (safetensors' mmapped fp32 ones may start 8 bytes in)."""
    seqs = _sequences((1, 7, 64))
    before = emulate.launches.copy()
    got = _ours(folders["qwen3"], seqs, emulated=True)
    ran = emulate.launches - before
    assert ran["residual_rmsnorm"] + ran["residual_rmsnorm_vec"] == 2 * 4 + 1, ran
    assert torch.allclose(got, _ours(folders["qwen3"], seqs), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_emulated_cuda_path_in_half_precision_stays_close(folders, dtype):
    """Qwen2 (no q/k norm): the fused kernel, packed (weights cast to the dtype are fresh, aligned tensors)."""
    seqs = _sequences((3, 50))
    before = emulate.launches.copy()
    got, want = _ours(folders["qwen2"], seqs, dtype, emulated=True), _ours(folders["qwen2"], seqs)
    assert (emulate.launches - before)["residual_rmsnorm_vec"] == 2 * 2 + 1
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min().item() >= 0.999, cosine


def test_the_arena_plans_the_emulated_cuda_path(folders):
    """The kernels write through raw pointers: the arena's recording still sees each launch's tensors (their data_ptr
    calls), so the planned forward gives what fresh allocations give."""
    seqs = _sequences((2, 30, 9))
    with cuda.emulation():
        planned, _, _ = load_model(str(folders["qwen3"]))
        fresh, _, _ = load_model(str(folders["qwen3"]), memory_arena=False)
        assert planned.arena is not None
        got, want = planned.embed(seqs), fresh.embed(seqs)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_stays_close_to_float32(folders):
    seqs = _sequences((3, 50, 200))
    assert bfloat16_cosine(lambda dtype: _ours(folders["qwen3"], seqs, dtype), seqs, "last") >= 0.99


def test_bidirectional_attention_when_custom_code_asks_for_it(folders, tmp_path):
    custom = tmp_path / "gte-like"
    shutil.copytree(folders["qwen2"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_qwen.Qwen2Model"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match='add "is_causal": false to config.json'):
        read_model_folder(custom)
    (custom / "config.json").write_text(json.dumps({**cfg, "is_causal": False}))
    seqs = _sequences((1, 6, 45))
    ours = _ours(custom, seqs)
    assert worst_per_sequence(ours, _transformers(custom, seqs, bidirectional=True), seqs) <= 2e-5
    assert worst_per_sequence(ours, _transformers(custom, seqs), seqs) <= 2e-5  # transformers 5 reads the key too
    assert worst_per_sequence(ours, _transformers(folders["qwen2"], seqs), seqs) > 1e-2  # causal attention differs on these


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rotary scaling 'yarn'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}, "rope_parameters": None}, "rotary scaling 'longrope'"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rotary scaling 'dynamic'"),  # beside a default 5 one
])
def test_config_refuses_what_the_decoder_does_not_compute(folders, change, needle):
    cfg = json.loads((folders["qwen3"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=needle):
        EncoderConfig.from_dict({**cfg, **change})


def test_transformers_4_configs_parse_as_5s(folders):
    """Qwen3-Embedding's own config.json (transformers 4.51) names rope_theta at the top level."""
    cfg = json.loads((folders["qwen3"] / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 1e6, "rope_scaling": None}
    assert EncoderConfig.from_dict(old).decoder.rope_theta == 1e6
    assert EncoderConfig.from_dict(cfg).decoder.rope_theta == 50000.0


def test_folder_check_names_a_missing_or_misshaped_weight(folders, tmp_path):
    folder_check_refuses(folders["qwen3"], tmp_path, "layers.1.self_attn.k_norm.weight",
                         ("layers.1.self_attn.k_norm.weight", torch.ones(16)),
                         r"layers.1.k_norm.weight is \[16\] in the files, \[32\] by config.json")


def test_a_causal_lm_checkpoint_loads_without_its_lm_head(folders, tmp_path):
    lm = causal_lm_copy(folders["qwen3"], tmp_path / "lm")
    seqs = _sequences((5, 30))
    assert torch.equal(_ours(lm, seqs), _ours(folders["qwen3"], seqs))


def test_causal_attention_on_every_offsets_form():
    g = torch.Generator().manual_seed(0)
    cu = [0, 1, 6, 6 + 19]
    q, k, v = (torch.randn(cu[-1], 2, 8, generator=g) for _ in range(3))
    want = torch.empty(cu[-1], 16)
    for s, e in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / 8 ** 0.5
        scores.masked_fill_(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        want[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e]).reshape(e - s, 16)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, causal=True), want, atol=1e-5, rtol=1e-5)
    layout = DeviceLayout(torch.tensor(cu, dtype=torch.int32), 20)
    torch.testing.assert_close(varlen_attention(q, k, v, layout, causal=True), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        varlen_attention(q, k, v, cu, attn_bias=torch.zeros(2, 19, 19), causal=True)


def test_no_cuda_graphs_and_an_arena_planned_forward(folders):
    embedder, _, info = load_model(str(folders["qwen3"]))
    assert isinstance(embedder.encoder, PackedDecoder) and embedder.arena is not None
    assert embedder.capture_graphs(64, 4) is False and embedder.graphs is None
    assert info.pooling == "last" and info.normalize and info.max_input_length == 512


def test_a_folder_without_modules_json_pools_its_last_token(folders, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folders["qwen3"], plain)
    (plain / "modules.json").unlink()
    assert load_model(str(plain), memory_arena=False)[2].pooling == "last"


def test_served_as_sentence_transformers_encodes(folders, tmp_path):
    """Through the server: TEI /embed with and without the query prompt, truncation to max_seq_length keeping the
    end-of-text token, and the OpenAI client; each against SentenceTransformer.encode."""
    import openai  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    short = qwen_folder(tmp_path, "qwen3", name="short", max_seq_length=24)
    sample = texts((1, 3, 20, 150))
    long_ones = texts((10, 40), seed=1)  # 40 words: cut to 23 tokens and <|endoftext|>
    with ServerThread(create_app(settings(model={"path": str(folders["qwen3"]), "name": "qwen3"}))) as s, s.client() as c:
        plain = c.post("/embed", json={"inputs": sample})
        query = c.post("/embed", json={"inputs": sample, "prompt_name": "query"})
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
        via_openai = [d.embedding for d in client.embeddings.create(model="qwen3", input=sample).data]
    st = SentenceTransformer(str(folders["qwen3"]), device="cpu")
    assert plain.status_code == 200 and query.status_code == 200, (plain.text, query.text)
    np.testing.assert_allclose(np.array(plain.json()), st.encode(sample), atol=2e-5)
    np.testing.assert_allclose(np.array(query.json()), st.encode(sample, prompt=QUERY_PROMPT), atol=2e-5)
    np.testing.assert_allclose(np.array(via_openai), st.encode(sample), atol=2e-5)
    assert np.abs(np.array(query.json()) - np.array(plain.json())).max() > 1e-2  # the prompt changed the vectors
    truncation_served_as_encode(short, long_ones, 24)
