"""EmbeddingGemma's architecture (Gemma3's text model, bidirectional) against transformers and sentence-transformers on
a small seeded random model (tests/gemma_folders.py): the packed forward (scaled embeddings, Gemma's (1 + weight)
RMSNorms around each sub-block, q/k norms, sliding-window and full layers with their own rotary bases, the
query_pre_attn_scalar scale, the GELU-tanh gated feed-forward block), the config's parsing and refusals, and the server
(mean pooling, two Dense modules, Normalize, named prompts)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kernels import cuda
from models.config import EncoderConfig, ModelFolderError
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.gemma import PackedGemma
from models.runtime import load_model
from models.weights import load_encoder
from server.app import create_app
from tests.gemma_folders import PROMPTS, SLIDING_WINDOW, gemma_folder, gemma_model_folder
from tests.mpnet_folders import texts
from tests.support import ServerThread, settings, worst_per_sequence

LENGTHS = (1, 2, 9, 13, 14, 40, 131, 300)  # tokens, <bos> and <eos> included; a sliding layer's window is 12 each side


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return gemma_model_folder(tmp_path_factory.mktemp("gemma"))


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(4, 80, size=n - 2).tolist(), 1] if n > 1 else [2] for n in lengths]


def _ours(folder, seqs, dtype=torch.float32, emulated: bool = False) -> torch.Tensor:
    parsed = read_model_folder(folder)
    model = load_encoder(parsed.encoder, parsed.weights).to(dtype=dtype)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(PackedBatch.from_ids(seqs, 0)).float()


def _transformers(folder, seqs) -> list[torch.Tensor]:
    """Each sequence alone (no padding): transformers' own bidirectional and sliding-window masks."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    model = tf.Gemma3TextModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]


def test_packed_forward_matches_transformers(model_folder):
    seqs = _sequences()
    ours = _ours(model_folder, seqs)
    worst = worst_per_sequence(ours, _transformers(model_folder, seqs), seqs)
    assert worst <= 2e-5, worst
    parts = read_model_folder(model_folder).encoder.decoder
    assert parts.window == SLIDING_WINDOW // 2 and parts.local_layers == (True, True, False, True, False)
    assert (parts.rope_theta, parts.local_rope_theta, parts.query_pre_attn_scalar) == (50000.0, 10000.0, 24.0)


def test_the_window_and_the_scale_matter(model_folder, tmp_path):
    """Against the same weights with a window wider than any sequence, and with query_pre_attn_scalar = head_dim: the
    long sequence differs (so the comparison above checks the window and the scale), the short one only by the scale."""
    seqs = _sequences((9, 131))
    ours = _ours(model_folder, seqs)
    for change in ({"sliding_window": 1000}, {"query_pre_attn_scalar": 32}):
        other = tmp_path / next(iter(change))
        other.mkdir()
        for f in model_folder.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((model_folder / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**cfg, **change}))
        theirs = _ours(other, seqs)
        assert (ours[9:] - theirs[9:]).abs().max().item() > 1e-2, change
        windowed = "sliding_window" in change
        assert ((ours[:9] - theirs[:9]).abs().max().item() > 1e-2) != windowed, change


def test_the_emulated_cuda_path_gives_the_cpu_paths_embeddings(model_folder):
    """Under the CUDA emulator: windowed attention one SDPA call a sequence, the norms torch's in float32."""
    seqs = _sequences((1, 7, 64))
    torch.testing.assert_close(_ours(model_folder, seqs, emulated=True), _ours(model_folder, seqs), atol=1e-5, rtol=0)


def test_bfloat16_stays_close_to_float32(model_folder):
    seqs = _sequences((3, 50, 200))
    got, want = _ours(model_folder, seqs, torch.bfloat16), _ours(model_folder, seqs)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min().item() >= 0.99, cosine


def _config(model_folder) -> dict:
    return json.loads((model_folder / "config.json").read_text())


def test_float16_is_refused_at_start(model_folder):
    """Gemma3's activations overflow float16 (Google's model card): refused with the reason, where float16 could run
    (the CUDA code path; here on the emulator), and bfloat16 accepted."""
    from models.checks import check_model_settings  # noqa: PLC0415

    with cuda.emulation():
        with pytest.raises(ModelFolderError, match="overflow float16"):
            check_model_settings(read_model_folder(model_folder), "cpu", "float16")
        check_model_settings(read_model_folder(model_folder), "cpu", "bfloat16")


def test_transformers_4_configs_parse_as_5s(model_folder):
    """EmbeddingGemma's own config.json (transformers 4.57) names the rotary bases at the top level."""
    cfg = _config(model_folder)
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                                                      "rope_scaling": None}
    parts = EncoderConfig.from_dict(old).decoder
    assert (parts.rope_theta, parts.local_rope_theta) == (1e6, 1e4)
    no_types = {k: v for k, v in cfg.items() if k != "layer_types"} | {"sliding_window_pattern": 3, "sliding_window": 7}
    parts = EncoderConfig.from_dict(no_types).decoder  # transformers' default: every 3rd layer full
    assert parts.local_layers == (True, True, False, True, True) and parts.window == 3


@pytest.mark.parametrize("change,needle", [
    ({"use_bidirectional_attention": False}, "causal Gemma3"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rotary scaling 'linear'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rotary scaling 'yarn'"),
    ({"hidden_activation": "quick_gelu"}, "hidden_activation 'quick_gelu' is not supported"),
    ({"layer_types": ["full_attention"] * 4}, "for each of its 5 layers"),
    ({"layer_types": ["chunked_attention"] * 5}, "for each of its 5 layers"),
    ({"sliding_window": None}, "sliding_window=None"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_config_refuses_what_gemma_does_not_compute(model_folder, change, needle):
    with pytest.raises(ModelFolderError, match=needle):
        EncoderConfig.from_dict({**_config(model_folder), **change})


def test_served_as_sentence_transformers_encodes(tmp_path):
    """Through the server: TEI /embed with and without the query prompt against SentenceTransformer.encode (mean
    pooling, both Dense modules, Normalize); the arena planned the forward, the vectors are the Dense head's size."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    folder = gemma_folder(tmp_path)
    embedder, _, info = load_model(str(folder))
    assert isinstance(embedder.encoder, PackedGemma) and embedder.arena is not None
    assert info.pooling == "mean" and info.normalize and info.dim == 64
    sample = texts((1, 3, 20, 150))
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "gemma"}))) as s, s.client() as c:
        plain = c.post("/embed", json={"inputs": sample})
        query = c.post("/embed", json={"inputs": sample, "prompt_name": "query"})
    st = SentenceTransformer(str(folder), device="cpu")
    assert plain.status_code == 200 and query.status_code == 200, (plain.text, query.text)
    np.testing.assert_allclose(np.array(plain.json()), st.encode(sample), atol=2e-5)
    np.testing.assert_allclose(np.array(query.json()), st.encode(sample, prompt=PROMPTS["query"]), atol=2e-5)
    assert np.abs(np.array(query.json()) - np.array(plain.json())).max() > 1e-2  # the prompt changed the vectors
