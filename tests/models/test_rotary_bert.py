"""NomicBERT and GTE against transformers and sentence-transformers on small seeded random models
(tests/rotary_bert_folders.py): the packed forward (rotary positions, gated feed-forward, post-norm, biases or none,
token types), both config.json layouts (the custom code's, which TEI reads, and transformers 5's), GTE's NTK scaling,
the config's refusals, the folder check, the GTE re-ranker and the server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kernels import cuda
from models.config import EncoderConfig, ModelFolderError
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.rotary_bert import PackedRotaryBert
from models.runtime import finish_embedding, load_model
from models.weights import load_encoder
from server.app import create_app
from tests.mpnet_folders import texts
from tests.rotary_bert_folders import HIDDEN, gte_reranker_folder, original_config, rotary_bert_folder
from tests.support import ServerThread, bfloat16_cosine, folder_check_refuses, settings, worst_per_sequence

LENGTHS = (1, 2, 5, 17, 64, 300)
KINDS = ("nomic", "gte", "gte-types0")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotary_bert")
    return {"nomic": rotary_bert_folder(root, "nomic"), "gte": rotary_bert_folder(root, "gte", seed=1),
            # gte-base-en-v1.5's: no token type table at all
            "gte-types0": rotary_bert_folder(root, "gte", "gte-types0", seed=2, type_vocab_size=0,
                                             hidden_act="gelu_pytorch_tanh")}


def _with_config(folder, dest, cfg: dict):
    """A copy of `folder` whose config.json is `cfg`."""
    shutil.copytree(folder, dest)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    """[CLS] words [SEP] (a lone [CLS] for length 1)."""
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, 100, size=max(n - 2, 0)).tolist(), 3][:n] for n in lengths]


def _ours(folder, seqs, dtype=torch.float32, emulated: bool = False, segments=None) -> torch.Tensor:
    parsed = read_model_folder(folder)
    model = load_encoder(parsed.encoder, parsed.weights).to(dtype=dtype)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(PackedBatch.from_ids(seqs, 0, segments=segments)).float()


def _transformers(folder, seqs, attn: str = "sdpa", types=None) -> list[torch.Tensor]:
    """Each sequence alone (no padding, no mask given); types: each sequence's token type ids."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    cfg = json.loads((folder / "config.json").read_text())
    make = tf.NomicBertModel if cfg["model_type"] == "nomic_bert" else tf.GteModel
    model = make.from_pretrained(str(folder), attn_implementation=attn).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s]), token_type_ids=None if types is None else torch.tensor([types[i]]))
                .last_hidden_state[0] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_forward_matches_transformers(folders, kind, attn):
    seqs = _sequences()
    worst = worst_per_sequence(_ours(folders[kind], seqs), _transformers(folders[kind], seqs, attn), seqs)
    assert worst <= 2e-5, worst
    parts = read_model_folder(folders[kind]).encoder.rotary
    assert parts.qkv_bias == parts.out_bias == parts.down_bias == kind.startswith("gte")
    assert parts.rope_theta == (1000.0 if kind == "nomic" else 160000.0)


def test_token_types_of_text_pairs_count(folders):
    """A pair's second text is of type 1 (NomicBERT has two types): as transformers given those token_type_ids."""
    seqs, starts = _sequences((9, 40)), [4, 25]
    types = [[int(i >= s) for i in range(len(q))] for q, s in zip(seqs, starts)]
    got = _ours(folders["nomic"], seqs, segments=starts)
    assert worst_per_sequence(got, _transformers(folders["nomic"], seqs, types=types), seqs) <= 2e-5
    assert worst_per_sequence(got, _transformers(folders["nomic"], seqs), seqs) > 1e-3  # the types matter


@pytest.mark.parametrize("kind", ["nomic", "gte"])
def test_the_custom_codes_config_layout_is_the_same_model(folders, tmp_path, kind):
    """nomic-embed-text's and gte-*-v1.5's own config.json (n_embd, ..., rotary_emb_base; model_type "new",
    rope_theta), as TEI reads them: the same architecture, the same output."""
    orig = _with_config(folders[kind], tmp_path / "orig", original_config(folders[kind]))
    new, old = (read_model_folder(f).encoder for f in (folders[kind], orig))
    assert old.rotary == new.rotary and old.model_type == new.model_type and old.type_vocab_size == new.type_vocab_size
    assert (old.hidden_size, old.num_layers, old.intermediate_size, old.layer_norm_eps, old.activation) == \
           (new.hidden_size, new.num_layers, new.intermediate_size, new.layer_norm_eps, new.activation)
    seqs = _sequences((3, 70))
    assert torch.equal(_ours(orig, seqs), _ours(folders[kind], seqs))


def test_nomic_pads_its_vocabulary_as_the_custom_code_does(folders):
    """nomic-bert's code rounds vocab_size up to pad_vocab_size_multiple (the table in the files has that many rows)."""
    cfg = original_config(folders["nomic"])
    assert EncoderConfig.from_dict(cfg | {"vocab_size": 30522, "pad_vocab_size_multiple": 64}).vocab_size == 30528
    assert EncoderConfig.from_dict(cfg | {"vocab_size": 30528, "pad_vocab_size_multiple": 64}).vocab_size == 30528
    assert EncoderConfig.from_dict(cfg | {"vocab_size": 30522}).vocab_size == 30522


def test_gte_ntk_scaling_is_the_custom_codes(folders, tmp_path):
    """rope_scaling {"type": "ntk", "factor": f} (gte-*-v1.5's): base rope_theta * f, every frequency divided by
    f ** (2 / head_dim) -- transformers' "linear" scaling by that divisor over that base computes the same."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    factor, head_dim = 2.0, HIDDEN // 4
    cfg = original_config(folders["gte"]) | {"rope_scaling": {"type": "ntk", "factor": factor}, "rope_theta": 5e5}
    scaled = _with_config(folders["gte"], tmp_path / "ntk", cfg)
    native = json.loads((folders["gte"] / "config.json").read_text())
    native["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5e5 * factor, "factor": factor ** (2 / head_dim)}
    model = tf.GteModel.from_pretrained(str(folders["gte"]), config=tf.GteConfig(**native)).eval()
    seqs = _sequences((5, 300))
    with torch.inference_mode():
        want = [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]
    assert worst_per_sequence(_ours(scaled, seqs), want, seqs) <= 2e-5
    assert worst_per_sequence(_ours(folders["gte"], seqs), want, seqs) > 1e-3  # the scaling matters


def test_the_cuda_code_path_on_the_emulator_runs_as_the_cpu_one(folders):
    """The kernel path: each bias + residual + LayerNorm through kernels/layernorm.py's kernel (on the emulator)."""
    seqs = _sequences((1, 7, 64))
    for kind in KINDS:
        assert torch.allclose(_ours(folders[kind], seqs, emulated=True), _ours(folders[kind], seqs), atol=1e-5), kind


def test_bfloat16_stays_close_to_float32(folders):
    seqs = _sequences((3, 50, 200))
    assert bfloat16_cosine(lambda dtype: _ours(folders["nomic"], seqs, dtype), seqs) >= 0.99


def test_sentence_transformers_folder_served_as_encode_gives(folders):
    """load_model + embed (with the memory arena, as served) against SentenceTransformer.encode, which pads."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((0, 3, 20, 140, 260))
    for kind, folder in folders.items():
        want = SentenceTransformer(str(folder), device="cpu").encode(sample)
        embedder, tokenizer, info = load_model(str(folder))
        assert isinstance(embedder.encoder, PackedRotaryBert) and embedder.arena is not None
        assert embedder.capture_graphs(64, 4) is False
        got = finish_embedding(embedder.embed([e.ids for e in tokenizer.encode(sample)]), info.normalize)
        assert info.pooling == ("mean" if kind == "nomic" else "cls") and info.normalize and info.dim == HIDDEN
        assert np.abs(got - want).max() <= 2e-5, (kind, np.abs(got - want).max())


def test_a_folder_in_the_custom_codes_layout_over_http(folders, tmp_path):
    """What a user of TEI has on disk (nomic-embed-text's config.json): /embed and the openai client's
    /v1/embeddings give sentence-transformers' vectors of the same weights."""
    import openai  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    orig = _with_config(folders["nomic"], tmp_path / "nomic-orig", original_config(folders["nomic"]))
    sample = texts((2, 30, 200), seed=3)
    want = SentenceTransformer(str(folders["nomic"]), device="cpu").encode(sample)
    with ServerThread(create_app(settings(model={"path": str(orig), "name": "nomic"}))) as s, s.client() as c:
        embedded = c.post("/embed", json={"inputs": sample})
        info = c.get("/info").json()
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=30)
        answer = client.embeddings.create(model="nomic", input=sample)
    assert embedded.status_code == 200, embedded.text
    np.testing.assert_allclose(np.array(embedded.json()), want, atol=2e-5)
    np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), want, atol=2e-5)
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 512


NOMIC_REFUSED = [({"rotary_emb_fraction": 0.5}, "rotary_emb_fraction=0.5"),
                 ({"rotary_emb_interleaved": True}, "rotary_emb_interleaved=True"),
                 ({"rotary_scaling_factor": 2.0}, "rotary_scaling_factor=2.0"),
                 ({"prenorm": True}, "prenorm=True"), ({"qkv_proj_bias": True}, "qkv_proj_bias=True"),
                 ({"activation_function": "gelu"}, "activation_function 'gelu'"), ({"n_inner": None}, "no n_inner")]
GTE_REFUSED = [({"position_embedding_type": "absolute"}, "position_embedding_type='absolute'"),
               ({"logn_attention_scale": True}, "logn_attention_scale=True"), ({"pack_qkv": False}, "pack_qkv=False"),
               ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rotary scaling 'yarn'"),
               ({"rope_scaling": {"type": "ntk", "factor": 0.5}}, "'factor': 0.5}"),
               ({"rope_scaling": {"type": "ntk", "factor": 2.0, "mixed_b": 0.5}}, "without mixed_b"),
               ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"), ({"type_vocab_size": -1}, "type_vocab_size=-1")]


@pytest.mark.parametrize("kind,change,needle", [*(("nomic", c, n) for c, n in NOMIC_REFUSED),
                                                *(("gte", c, n) for c, n in GTE_REFUSED)])
def test_config_refuses_what_it_does_not_compute(folders, kind, change, needle):
    with pytest.raises(ModelFolderError, match=needle):
        EncoderConfig.from_dict(original_config(folders[kind]) | change)


def test_transformers_5s_layout_refuses_scaling(folders):
    cfg = json.loads((folders["nomic"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="rotary scaling 'yarn'"):
        EncoderConfig.from_dict(cfg | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ModelFolderError, match="head_dim=8 times num_attention_heads"):
        EncoderConfig.from_dict(cfg | {"head_dim": 8})


def test_folder_check_names_a_missing_or_misshaped_weight(folders, tmp_path):
    up_gate = load_file(str(folders["gte"] / "model.safetensors"))["encoder.layer.1.mlp.up_gate_proj.weight"]
    folder_check_refuses(folders["gte"], tmp_path, "encoder.layer.0.attn_ln.bias",
                         ("encoder.layer.1.mlp.up_gate_proj.weight", up_gate[:96].contiguous()),  # the gate half lost
                         r"layers.1.up_gate.weight is \[96, 64\] in the files, \[192, 64\] by config")


@pytest.mark.parametrize("typed", [True, False])
def test_a_gte_reranker_scores_as_cross_encoder_does(tmp_path, typed):
    """GteForSequenceClassification (gte-multilingual-reranker-base's architecture; here with two token types)
    through /rerank, against CrossEncoder.predict: a pair's second text of type 1 where the tokenizer hands the model
    token types (`typed`), else of type 0 as transformers then runs it (this failed by 0.04 when the server took the
    types from tokenizer.json's template whatever the tokenizer's model_input_names)."""
    from sentence_transformers import CrossEncoder  # noqa: PLC0415

    folder = gte_reranker_folder(tmp_path, typed=typed)
    query, docs = "what is deep learning", [*texts((3, 30, 120), seed=2), "deep learning models embed text"]
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "gte-reranker"}))) as s, s.client() as c:
        ranked = c.post("/rerank", json={"query": query, "texts": docs})
    assert ranked.status_code == 200, ranked.text
    want = CrossEncoder(str(folder), device="cpu").predict([(query, d) for d in docs])
    got = {r["index"]: r["score"] for r in ranked.json()}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=2e-5)
    assert want.max() - want.min() > 1e-2  # the scores differ: a wrong head would show
