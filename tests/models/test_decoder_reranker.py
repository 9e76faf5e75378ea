"""Decoder-only re-rankers and classifiers (Qwen2/Qwen3/Mistral/Llama *ForSequenceClassification: Qwen3-Reranker
"seq-cls", mxbai-rerank-v2) against sentence-transformers' CrossEncoder and transformers on small seeded random models
(tests/decoder_reranker_folders.py): the token transformers' head reads (the last that is not the pad token), the
`score` head, the server's routes, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelFolderError, classifier_head
from models.encoder import PackedBatch, ScoreHead
from server.app import create_app
from tests.decoder_reranker_folders import PAD, decoder_reranker_folder
from tests.mpnet_folders import texts
from tests.support import ServerThread, folder_check_refuses, settings

QUERY = "what is the answer"
# the template appends <|endoftext|> (the pad token) to each text: transformers reads the token before it; a document
# that itself ends with it is read two tokens from the end, one that is only it at the query's last word
DOCS = [*texts((3, 30, 90), seed=2), "find the answer <|endoftext|>", "<|endoftext|>"]


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def _hf_last_token_logits(folder, pairs) -> np.ndarray:
    """transformers' logits had it read each pair's very last token (pad_token_id None: row -1), one pair at a time."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    model.config.pad_token_id = None
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        return np.concatenate([model(**tokenizer(q, d, return_tensors="pt")).logits.numpy() for q, d in pairs])


def test_the_head_reads_the_last_token_that_is_not_the_pad_token():
    """transformers' rule on packed sequences: the rightmost non-pad token, the first when every one is the pad token;
    with no pad_token_id, the last."""
    seqs = [[5, 6, PAD], [PAD, PAD], [7], [PAD, 8, PAD, PAD], [9, PAD, 10]]
    batch = PackedBatch.from_ids(seqs, 0)
    hidden = torch.arange(batch.input_ids.shape[0], dtype=torch.float32)[:, None].repeat(1, 4)  # row i: i
    assert ScoreHead(4, 1, PAD).last_tokens(hidden, batch)[:, 0].tolist() == [1, 3, 5, 7, 12]
    assert ScoreHead(4, 1, None).last_tokens(hidden, batch)[:, 0].tolist() == [2, 4, 5, 9, 12]


@pytest.mark.parametrize("model_type,config", [("qwen3", {}), ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_a_decoder_reranker_scores_as_cross_encoder_does(tmp_path, model_type, config):
    """Qwen3ForSequenceClassification (Qwen3-Reranker-seq-cls's architecture) and a Llama one through /rerank and
    /v1/rerank against CrossEncoder.predict; reading the very last token (the appended pad) would be far off."""
    from sentence_transformers import CrossEncoder  # noqa: PLC0415

    folder = decoder_reranker_folder(tmp_path, model_type, **config)
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "dec-reranker"}))) as s, s.client() as c:
        ranked = c.post("/rerank", json={"query": QUERY, "texts": DOCS})
        cohere = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": False})
        info = c.get("/info").json()
    assert ranked.status_code == 200, ranked.text
    assert cohere.status_code == 200, cohere.text
    pairs = [(QUERY, d) for d in DOCS]
    want = CrossEncoder(str(folder), device="cpu").predict(pairs)
    got = {r["index"]: r["score"] for r in ranked.json()}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=2e-5)
    got = {r["index"]: r["relevance_score"] for r in cohere.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=2e-5)
    assert want.max() - want.min() > 5e-2  # the scores differ: a wrong head would show
    assert np.abs(_sigmoid(_hf_last_token_logits(folder, pairs)[:, 0]) - want).max() > 5e-2  # so would the pad token
    assert "reranker" in info["model_type"]


def test_a_three_label_decoder_classifier_through_predict(tmp_path):
    """A MistralForSequenceClassification with three labels: /predict's logits for texts (one that is only the pad
    token: read at its first) and pairs, against transformers' on a right-padded batch."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    labels = ("negative", "neutral", "positive")
    folder = decoder_reranker_folder(tmp_path, "mistral", labels, seed=1)
    inputs = [texts((12,), seed=3)[0], "<|endoftext|>", [QUERY, DOCS[3]], [QUERY, DOCS[1]]]
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "dec-clf"}))) as s, s.client() as c:
        r = c.post("/predict", json={"inputs": inputs, "raw_scores": True})
        info = c.get("/info").json()
    assert r.status_code == 200, r.text
    got = np.array([[{d["label"]: d["score"] for d in row}[label] for label in labels] for row in r.json()])
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        singles = model(**tokenizer(inputs[:2], padding=True, return_tensors="pt")).logits.numpy()
        pairs = model(**tokenizer(*zip(*inputs[2:]), padding=True, return_tensors="pt")).logits.numpy()
    want = np.concatenate([singles, pairs])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want[:, None] - want[None]).max() > 5e-2  # the inputs' logits differ
    assert "classifier" in info["model_type"]


@pytest.mark.parametrize("change,needle", [
    ({"architectures": ["Gemma3TextForSequenceClassification"], "model_type": "gemma3_text"}, "is not supported"),
    ({"pad_token_id": [0, 1]}, "pad_token_id [0, 1] is not a token id"),
    ({"problem_type": "multi_label_classification"}, "multi-label classification heads are not supported"),
])
def test_config_refuses_what_the_head_does_not_compute(change, needle):
    cfg = {"architectures": ["Qwen3ForSequenceClassification"], "model_type": "qwen3", "pad_token_id": 0,
           "id2label": {"0": "LABEL_0"}, **change}
    with pytest.raises(ModelFolderError, match=needle.replace("[", r"\[").replace("]", r"\]")) as refused:
        classifier_head(cfg)
    assert "\n" not in str(refused.value)


def test_folder_check_names_a_missing_or_misshaped_score(tmp_path):
    folder = decoder_reranker_folder(tmp_path, "qwen2")
    folder_check_refuses(folder, tmp_path, "score.weight", ("score.weight", torch.zeros(1, 32)),
                         r"out.weight is \[1, 32\] in the files, \[1, 64\] by config.json")
