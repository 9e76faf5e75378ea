"""A causal LM served as a re-ranker from its LM head (model.classifier_from_token), as vLLM serves the original
Qwen3-Reranker (Qwen3ForCausalLM, ["no", "yes"]): the scores against transformers' Qwen3ForCausalLM logits on small
seeded random folders (tests/decoder_reranker_folders.py), tied and untied heads, one token and two, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from configs.settings import load_settings
from models.config import ModelFolderError, default_model_path
from models.folder import read_model_folder, token_classifier
from server.app import create_app
from tests.decoder_reranker_folders import PAD, causal_lm_folder, decoder_reranker_folder
from tests.mpnet_folders import texts
from tests.support import ServerThread, settings

QUERY = "what is the answer"
# the template appends <|endoftext|> (the pad token): the head reads the token before it; a document that itself ends
# with it is read two tokens from the end, one that is only it at the query's last word
DOCS = [*texts((3, 30, 90), seed=2), "is the answer yes or no", "find the answer <|endoftext|>", "<|endoftext|>"]


def hf_token_probabilities(folder, pairs, tokens: list[str]) -> np.ndarray:
    """transformers' Qwen3ForCausalLM, one pair at a time (the tokenizer's pair template), at the token the score head
    reads (the last that is not the pad token): softmax over the tokens' logits, the last's; one token: its logit's
    sigmoid."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    out = []
    with torch.inference_mode():
        for query, doc in pairs:
            enc = tokenizer(query, doc, return_tensors="pt")
            kept = (enc["input_ids"][0] != PAD).nonzero()
            row = int(kept[-1]) if len(kept) else 0
            logits = model(**enc).logits[0, row, ids].double()
            out.append(torch.softmax(logits, 0)[-1] if len(ids) == 2 else torch.sigmoid(logits[0]))
    return np.array([float(p) for p in out])


def _rerank(app_settings) -> tuple[np.ndarray, dict]:
    with ServerThread(create_app(app_settings)) as s, s.client() as c:
        ranked = c.post("/rerank", json={"query": QUERY, "texts": DOCS})
        info = c.get("/info").json()
    assert ranked.status_code == 200, ranked.text
    got = {r["index"]: r["score"] for r in ranked.json()}
    return np.array([got[i] for i in range(len(DOCS))]), info


@pytest.mark.parametrize("tied", [False, True])
def test_yes_no_scores_are_the_causal_lms_softmax(tmp_path, tied):
    """["no", "yes"]: each score is softmax([logit_no, logit_yes])[1] at the token read, with lm_head.weight and with
    the token embeddings as the LM head (tied: the files hold no lm_head.weight)."""
    folder = causal_lm_folder(tmp_path, tied=tied)
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        assert ("lm_head.weight" in st.keys()) is not tied
    got, info = _rerank(settings(model={"path": str(folder), "name": "qwen3-reranker",
                                        "classifier_from_token": ["no", "yes"]}))
    want = hf_token_probabilities(folder, [(QUERY, d) for d in DOCS], ["no", "yes"])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want[:, None] - want[None]).max() > 5e-2  # the scores differ: a wrong row or token would show
    assert "reranker" in info["model_type"]


def test_one_token_as_the_reranker_beside_the_embedder(tmp_path):
    """reranker.classifier_from_token = ["yes"]: score = sigmoid(logit_yes), served beside the embedded model."""
    folder = causal_lm_folder(tmp_path, seed=3)
    got, _ = _rerank(settings(reranker={"path": str(folder), "name": "yes-reranker", "classifier_from_token": ["yes"]}))
    want = hf_token_probabilities(folder, [(QUERY, d) for d in DOCS], ["yes"])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want[:, None] - want[None]).max() > 5e-2


def test_the_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("TURBOSERVE_MODEL__CLASSIFIER_FROM_TOKEN", '["no","yes"]')
    assert load_settings().model.classifier_from_token == ["no", "yes"]
    with pytest.raises(ValidationError, match="classifier_from_token"):  # more than two: refused by the settings too
        load_settings(None, {"reranker": {"path": "x", "classifier_from_token": ["a", "b", "c"]}})


@pytest.mark.parametrize("kind,tokens,needle", [
    ("bert", ["no", "yes"], "is a bert model"),
    ("seq-cls", ["no", "yes"], "has a classifier head of its own"),
    ("causal", ["no", "maybe", "yes"], "one token .* or two .* not 3"),
    ("causal", ["maybe"], "'maybe' is not one token .* an unknown token"),
    ("causal", ["yes no"], "'yes no' is not one token .* 2 tokens"),
])
def test_refused_where_it_does_not_apply(tmp_path, kind, tokens, needle):
    path = {"bert": default_model_path, "seq-cls": lambda: decoder_reranker_folder(tmp_path),
            "causal": lambda: causal_lm_folder(tmp_path)}[kind]()
    with pytest.raises(ModelFolderError, match=f"reranker.classifier_from_token=.*{needle}") as refused:
        token_classifier(read_model_folder(path), tokens, "reranker")
    assert "\n" not in str(refused.value)
