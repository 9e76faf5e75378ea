"""sentence-transformers folder layouts: what the server computes equals SentenceTransformer.encode on the same
folder (do_lower_case, the tokenizer's model_max_length, Dense heads), and what it does not compute is refused at
load, not served silently different (a LayerNorm module, several pooling modes at once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.config import ModelFolderError, default_model_path
from models.folder import read_model_folder
from models.runtime import finish_embedding, load_model
from tests.cross_encoders import TOKENIZER_FILES
from tests.hf_import import import_transformers

TEXTS = ["Hello World", "The Quick Brown Fox jumps", "all lower case already"]


def _folder(root: Path, name: str, pooling: dict, sbert: dict, modules: list | None = None, cased: bool = False) -> Path:
    """A tiny random BERT saved by transformers with MiniLM's tokenizer (cased: its lower-casing turned off), laid
    out for sentence-transformers."""
    import torch  # noqa: PLC0415

    tf = import_transformers()
    folder = root / name
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=512)
    tf.BertModel(config, add_pooling_layer=False).eval().save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        shutil.copy(default_model_path() / file, folder / file)
    if cased:
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        tokenizer["normalizer"].update(lowercase=False, strip_accents=False)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        config_file = folder / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbert))
    (folder / "modules.json").write_text(json.dumps(modules or [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    return folder


def _ours(folder: Path, texts: list[str]) -> tuple[np.ndarray, int]:
    embedder, tokenizer, info = load_model(str(folder), memory_arena=False)
    ids = [e.ids for e in tokenizer.encode(texts, truncate=True)]
    return finish_embedding(embedder.embed(ids), False), info.max_input_length


def test_do_lower_case_lowercases_before_tokenizing(tmp_path):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    folder = _folder(tmp_path, "lower", {"pooling_mode_mean_tokens": True}, {"max_seq_length": 64, "do_lower_case": True},
                     cased=True)
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    got, _ = _ours(folder, TEXTS)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_tokenizers_model_max_length_caps_inputs_when_sentence_transformers_sets_none(tmp_path):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    folder = _folder(tmp_path, "tokmax", {"pooling_mode_mean_tokens": True}, {})
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 40}))
    model = SentenceTransformer(str(folder), device="cpu")
    long = " ".join(["word"] * 80)
    got, limit = _ours(folder, [long])
    assert limit == model.max_seq_length == 40
    np.testing.assert_allclose(got, model.encode([long]), atol=2e-5)


def test_dense_modules_project_the_pooled_vector_as_sentence_transformers_does(tmp_path):
    """A Dense head (LaBSE's kind: 64 -> 32, tanh; then 32 -> 24, identity) between the pooling and Normalize."""
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer, models  # noqa: PLC0415

    plain = _folder(tmp_path, "plain", {"pooling_mode_mean_tokens": True}, {"max_seq_length": 64})
    torch.manual_seed(1)
    transformer = models.Transformer(str(plain), max_seq_length=64)
    modules = [transformer, models.Pooling(64, "mean"), models.Dense(64, 32, activation_function=torch.nn.Tanh()),
               models.Dense(32, 24, bias=False, activation_function=torch.nn.Identity()), models.Normalize()]
    folder = tmp_path / "dense"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    embedder, tokenizer, info = load_model(str(folder), memory_arena=False)
    got = finish_embedding(embedder.embed([e.ids for e in tokenizer.encode(TEXTS)]), info.normalize)
    assert info.dim == 24 and info.normalize
    np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(ModelFolderError, match="24-dim output"):  # sizes of the encoder's 64, not the head's 24
        load_model(str(folder), memory_arena=False, matryoshka_dimensions=[32, 16])
    # A Dense module whose weights are not of the shape its config gives is refused by the folder check, from the
    # headers (before, only when the weights were loaded, the server's port already open).
    import json  # noqa: PLC0415

    from models.checks import check_model_settings  # noqa: PLC0415

    dense_config = next(folder.glob("*Dense*/config.json"))
    config = json.loads(dense_config.read_text())
    dense_config.write_text(json.dumps({**config, "out_features": config["out_features"] + 1}))
    with pytest.raises(ModelFolderError, match="a Dense module of"):
        check_model_settings(read_model_folder(folder), "cpu", "float32")


@pytest.mark.parametrize("case", ["layer norm", "two pooling modes", "two pooling modes, sentence-transformers 6"])
def test_what_the_server_does_not_compute_is_refused(tmp_path, case):
    pooling, modules = {"pooling_mode_mean_tokens": True}, None
    if case == "layer norm":
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}]
    elif case == "two pooling modes":
        pooling["pooling_mode_cls_token"] = True  # sentence-transformers concatenates the two
    else:
        pooling = {"pooling_mode": ["mean", "cls"]}  # how sentence-transformers 6 writes it
    folder = _folder(tmp_path, case.replace(" ", "_").replace(",", ""), pooling, {"max_seq_length": 64}, modules)
    with pytest.raises(ModelFolderError) as err:
        read_model_folder(folder)
    assert ("LayerNorm" in str(err.value)) if case == "layer norm" else ("together" in str(err.value))


@pytest.mark.parametrize("layout", ["normalize then dense", "dense on the token embeddings"])
def test_dense_modules_out_of_the_computed_order_are_refused(tmp_path, layout):
    """sentence-transformers applies modules in modules.json's order (and v6 lets a Dense act on token embeddings):
    served in Pooling, Dense, Normalize order, these vectors came out different (max |diff| 0.16-0.26)."""
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer, models  # noqa: PLC0415

    plain = _folder(tmp_path, "plain", {"pooling_mode_mean_tokens": True}, {"max_seq_length": 64})
    transformer = models.Transformer(str(plain), max_seq_length=64)
    if layout == "normalize then dense":
        modules = [transformer, models.Pooling(64, "mean"), models.Normalize(),
                   models.Dense(64, 32, activation_function=torch.nn.Tanh())]
    else:
        modules = [transformer, models.Dense(64, 32, activation_function=torch.nn.Tanh(), module_input_name="token_embeddings"),
                   models.Pooling(32, "mean")]
    folder = tmp_path / "layout"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    with pytest.raises(ModelFolderError, match="order this server computes"):
        read_model_folder(folder)
