"""Scaled rotary positions of decoder-only embedders against transformers on small seeded random models: Llama 3's
"llama3" scaling (Llama-3.1/3.2-based embedders') on a Llama folder (tests/mistral_folders.py) and "linear" scaling on
a Qwen3 one (tests/qwen_folders.py), in transformers 4's config layout (rope_scaling, its "type" key, a top-level
rope_theta) and 5's (rope_parameters); the other scalings still refused.

The Llama folder's original_max_position_embeddings is 32 with factor 8: with head_dim 16 and base 50000, the
frequencies' wavelengths (6.3, 24, 94, ... tokens) fall in all three of Llama 3's bands (under 32 / high_freq_factor
kept, over 32 / low_freq_factor divided by the factor, blended in between)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.arch_config import RotaryScaling
from models.config import EncoderConfig, ModelFolderError
from models.decoder import rotary_tables
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.runtime import load_model
from models.weights import load_encoder
from server.app import create_app
from tests.mistral_folders import mistral_folder
from tests.mpnet_folders import texts
from tests.qwen_folders import qwen_folder
from tests.support import ServerThread, settings, worst_per_sequence

LENGTHS = (1, 2, 9, 20, 40, 131, 300)  # tokens, <|endoftext|> included
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "factor": 4.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> folder: transformers 5's layout as save_pretrained writes it (rope_parameters), and each in transformers
    4's (rope_scaling with "type", rope_theta at the top level)."""
    root = tmp_path_factory.mktemp("scaled-rope")
    made = {"llama3": mistral_folder(root, "llama", name="llama3", rope_scaling=dict(LLAMA3)),
            "linear": qwen_folder(root, "qwen3", name="linear", seed=1, rope_scaling=dict(LINEAR))}
    for name, scaling in (("llama3", LLAMA3), ("linear", LINEAR)):
        old = {"type" if k == "rope_type" else k: v for k, v in scaling.items()}
        made[f"{name}_t4"] = _with_config(made[name], root / f"{name}_t4", rope_parameters=None, rope_theta=50000.0,
                                          rope_scaling=old)
    return made


def _with_config(folder, dest, **changes):
    """A copy of the folder with config.json's keys changed (None: left out)."""
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text()) | changes
    (dest / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dest


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(4, 70, size=n - 1).tolist(), 0] for n in lengths]


def _ours(folder, seqs) -> torch.Tensor:
    parsed = read_model_folder(folder)
    model = load_encoder(parsed.encoder, parsed.weights)
    with torch.inference_mode():
        return model(PackedBatch.from_ids(seqs, 0)).float()


def _transformers(folder, seqs) -> list[torch.Tensor]:
    """transformers' LlamaModel / Qwen3Model (AutoModel) last hidden states, each sequence alone (no padding)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    model = import_transformers().AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("name", ["llama3", "llama3_t4", "linear", "linear_t4"])
def test_packed_forward_matches_transformers(folders, name):
    seqs = _sequences()
    worst = worst_per_sequence(_ours(folders[name], seqs), _transformers(folders[name], seqs), seqs)
    assert worst <= 2e-5, worst
    parts = read_model_folder(folders[name]).encoder.decoder
    assert parts.rope_theta == 50000.0
    assert parts.rope_scaling == (RotaryScaling("llama3", 8.0, 1.0, 4.0, 32) if name.startswith("llama3")
                                  else RotaryScaling("linear", 4.0))


@pytest.mark.parametrize("name", ["llama3", "linear"])
def test_the_scaling_matters_on_these_weights(folders, tmp_path, name):
    """The same weights with plain rotary positions stray from transformers' scaled model far past the bound."""
    seqs = _sequences((20, 131))
    plain = _with_config(folders[name], tmp_path / "plain", rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    assert read_model_folder(plain).encoder.decoder.rope_scaling is None
    assert worst_per_sequence(_ours(plain, seqs), _transformers(folders[name], seqs), seqs) > 1e-2


@pytest.mark.parametrize("change", [
    {},  # transformers 5's layout, as saved
    {"rope_parameters": None, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 8192}},
    # original_max_position_embeddings left out: max_position_embeddings (4096); at the top level: that one
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32, "low_freq_factor": 1,
                         "high_freq_factor": 4}},
    {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}, "original_max_position_embeddings": 256},
    {"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2}, "head_dim": 128},
])
def test_rotary_tables_are_transformers_own(folders, change):
    """Our (cos, sin) tables: transformers' LlamaRotaryEmbedding's, bit for bit, at positions 0-20000, the config
    parsed by each side (Llama 3.1's own parameters among them)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    cfg = json.loads((folders["llama3"] / "config.json").read_text()) | change
    cfg = {k: v for k, v in cfg.items() if v is not None}
    parts = EncoderConfig.from_dict(cfg).decoder
    assert parts.rope_scaling is not None
    positions = torch.arange(20000)
    cos, sin = rotary_tables(positions, parts.head_dim, parts.rope_theta, torch.float32, scaling=parts.rope_scaling)
    rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(tf.LlamaConfig.from_dict(cfg))
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    half = parts.head_dim // 2
    assert torch.equal(cos[:, 0], want_cos[0, :, :half]) and torch.equal(sin[:, 0], want_sin[0, :, :half])


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rotary scaling 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rotary scaling 'dynamic'"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rotary scaling 'longrope'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0}},
     "llama3 rotary scaling needs a number high_freq_factor > 0; got None"),
    ({"rope_parameters": {**LLAMA3, "low_freq_factor": 4.0}}, "high_freq_factor > low_freq_factor"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "linear rotary scaling needs a number factor"),
])
def test_config_refuses_the_other_scalings(folders, change, needle):
    cfg = json.loads((folders["llama3"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=needle) as refused:
        EncoderConfig.from_dict({**cfg, **change})
    assert "\n" not in str(refused.value)
    if "rotary scaling '" in needle:
        assert "(plain, linear and llama3 rotary positions are)" in str(refused.value)


def test_served_as_sentence_transformers_encodes(folders):
    """load_model's embedder (the arena-planned forward) and the server's /embed: SentenceTransformer.encode's
    vectors, on texts far longer than the original 32 positions."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((1, 3, 20, 150))
    st = SentenceTransformer(str(folders["llama3_t4"]), device="cpu")
    embedder, tokenizer, _ = load_model(str(folders["llama3_t4"]))
    ours = embedder.embed([e.ids for e in tokenizer.encode(sample)])
    np.testing.assert_allclose(ours / np.linalg.norm(ours, axis=1, keepdims=True), st.encode(sample), atol=2e-5)
    with ServerThread(create_app(settings(model={"path": str(folders["llama3"]), "name": "llama3"}))) as s, s.client() as c:
        served = c.post("/embed", json={"inputs": sample})
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(np.array(served.json()), st.encode(sample), atol=2e-5)
