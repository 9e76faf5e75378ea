"""Cross-encoders and classifiers (server/routes_rerank.py): TEI's /rerank and /predict, the Cohere / Jina / vLLM
/v1/rerank, against transformers' logits and sentence-transformers' CrossEncoder on small models made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.runtime import load_model
from server.app import create_app
from tests.cross_encoders import cross_encoder_folder
from tests.hf_import import import_transformers
from tests.support import ServerThread, settings

QUERY = "what is deep learning?"
TEXTS = ["Deep learning is a kind of machine learning with many layers.", "Paris is the capital of France.", "cats",
         "Neural networks learn representations of data, layer after layer."]
PAIRS = [(QUERY, t) for t in TEXTS]


def hf_logits(folder, pairs=None, texts=None) -> np.ndarray:
    tf = import_transformers()
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    batch = tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt") if pairs else \
        tok(texts, padding=True, return_tensors="pt")
    if model.config.type_vocab_size < 2:
        batch.pop("token_type_ids")
    with torch.no_grad():
        return model(**batch).logits.numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-encoders")
    return {"bert": cross_encoder_folder(root), "roberta": cross_encoder_folder(root, style="roberta"),
            "classifier": cross_encoder_folder(root, ("negative", "neutral", "positive"), seed=1)}


@pytest.mark.parametrize("name", ["bert", "roberta", "classifier"])
def test_logits_match_transformers_for_pairs_and_single_texts(folders, name):
    embedder, tokenizer, info = load_model(str(folders[name]))
    assert info.kind == ("classifier" if name == "classifier" else "reranker") and info.dim == len(info.labels)
    encoded = tokenizer.encode_pairs(PAIRS)
    got = embedder.embed([e.ids for e in encoded], segments=[e.segment for e in encoded])
    np.testing.assert_allclose(got, hf_logits(folders[name], pairs=PAIRS), atol=2e-5)
    got = embedder.embed([e.ids for e in tokenizer.encode(TEXTS)])
    np.testing.assert_allclose(got, hf_logits(folders[name], texts=TEXTS), atol=2e-5)


def test_token_types_come_from_the_tokenizers_pair_template(folders):
    """A query that itself contains the separator token: the types are the template's (type 0 up to the
    template's separator), as transformers gives them, not guessed from the first [SEP] in the ids."""
    embedder, tokenizer, _ = load_model(str(folders["bert"]))
    pairs = [("first part [SEP] second part", "a document about deep learning"), (QUERY, TEXTS[0])]
    encoded = tokenizer.encode_pairs(pairs)
    assert encoded[0].ids.count(tokenizer.encode(["[SEP]"])[0].ids[-1]) == 3  # the literal one and the template's two
    got = embedder.embed([e.ids for e in encoded], segments=[e.segment for e in encoded])
    np.testing.assert_allclose(got, hf_logits(folders["bert"], pairs=pairs), atol=2e-5)


@pytest.fixture(scope="module")
def reranker(folders):
    with ServerThread(create_app(settings(model={"path": str(folders["bert"]), "name": "ce"}))) as server, \
            server.client() as client:
        yield client


def test_rerank_scores_are_sentence_transformers_cross_encoder_scores_best_first(reranker, folders):
    from sentence_transformers import CrossEncoder  # noqa: PLC0415

    want = CrossEncoder(str(folders["bert"]), device="cpu").predict(PAIRS)  # sigmoid of the logit for one label
    r = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})
    assert r.status_code == 200
    got = r.json()
    assert [g["index"] for g in got] == list(np.argsort(-want, kind="stable"))
    for g in got:
        assert g["score"] == pytest.approx(float(want[g["index"]]), abs=1e-5) and g["text"] == TEXTS[g["index"]]
    raw = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    logits = hf_logits(folders["bert"], pairs=PAIRS)[:, 0]
    assert all(g["score"] == pytest.approx(float(logits[g["index"]]), abs=1e-5) and "text" not in g for g in raw)


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_cohere_style_rerank_with_top_n_and_documents(reranker, path):
    body = {"model": "ce", "query": QUERY, "documents": [TEXTS[0], {"text": TEXTS[1]}, *TEXTS[2:]], "top_n": 2}
    r = reranker.post(path, json=body)
    assert r.status_code == 200
    doc = r.json()
    tei = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    assert [x["index"] for x in doc["results"]] == [x["index"] for x in tei[:2]]
    assert [x["relevance_score"] for x in doc["results"]] == pytest.approx([x["score"] for x in tei[:2]])
    assert all(x["document"]["text"] == TEXTS[x["index"]] for x in doc["results"])
    assert doc["model"] == "ce" and doc["usage"]["total_tokens"] > 0
    bare = reranker.post(path, json={"query": QUERY, "documents": TEXTS, "return_documents": False}).json()["results"]
    assert len(bare) == len(TEXTS) and all("document" not in x for x in bare)


def test_infinity_clients_rerank_body_gets_infinitys_answer(reranker):
    """infinity_client's RerankInput.to_dict() (it always sends raw_scores, return_documents and the default model):
    its ReRankResult needs usage.prompt_tokens, and reads each document as a plain string; raw_scores are logits."""
    body = {"query": QUERY, "documents": TEXTS, "return_documents": True, "raw_scores": False, "model": "default/not-specified"}
    r = reranker.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    tei = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    assert doc["object"] == "rerank" and doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] > 0
    assert [x["index"] for x in doc["results"]] == [x["index"] for x in tei]
    assert all(x["document"] == TEXTS[x["index"]] for x in doc["results"])
    raw = reranker.post("/rerank", json={**body, "raw_scores": True}).json()["results"]
    assert [x["relevance_score"] for x in raw] == pytest.approx([x["score"] for x in tei], abs=1e-5)


@pytest.mark.parametrize("path,body,status,needle", [
    ("/embed", {"inputs": "x"}, 424, "not an embedding model"),
    ("/v1/embeddings", {"model": "ce", "input": "x"}, 400, "not an embedding model"),
    ("/rerank", {"query": "", "texts": ["a"]}, 400, "query is an empty string"),
    ("/rerank", {"query": "q", "texts": ["a", ""]}, 400, "empty text"),
    ("/rerank", {"query": "q"}, 422, "texts"),
    ("/rerank", {"query": "q", "texts": ["long " * 600]}, 413, "tokens"),
    ("/v1/rerank", {"model": "other", "query": "q", "documents": ["a"]}, 404, "not served"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, 400, "document 0"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, 422, "a pair [text, text]"),
    # values of the wrong JSON type are refused, not coerced (as TEI's serde refuses them)
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncate": "true"}, 422, "truncate"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, 400, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "no"}, 400, "return_documents"),
    ("/predict", {"inputs": "a", "raw_scores": "on"}, 422, "raw_scores"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(reranker, path, body, status, needle):
    r = reranker.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.text and "Traceback" not in r.text
    assert reranker.post("/rerank", json={"query": "q", "texts": ["still here"]}).status_code == 200


def test_rerank_truncates_when_asked(reranker):
    r = reranker.post("/rerank", json={"query": "q", "texts": ["long " * 600, "short"], "truncate": True})
    assert r.status_code == 200 and sorted(x["index"] for x in r.json()) == [0, 1]


def test_predict_gives_softmax_label_scores_for_texts_pairs_and_batches(folders):
    with ServerThread(create_app(settings(model={"path": str(folders["classifier"]), "name": "clf"}))) as server, \
            server.client() as c:
        info = c.get("/info").json()["model_type"]
        assert info == {"classifier": {"id2label": {"0": "negative", "1": "neutral", "2": "positive"},
                                       "label2id": {"negative": 0, "neutral": 1, "positive": 2}}}
        logits = hf_logits(folders["classifier"], pairs=PAIRS[:2])
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        one = c.post("/predict", json={"inputs": list(PAIRS[0])}).json()  # two strings: one pair, as TEI reads them
        assert [x["label"] for x in one] == [["negative", "neutral", "positive"][j] for j in np.argsort(-probs[0])]
        assert [x["score"] for x in one] == pytest.approx(sorted(probs[0], reverse=True), abs=1e-5)
        batch = c.post("/predict", json={"inputs": [list(p) for p in PAIRS[:2]], "raw_scores": True}).json()
        assert len(batch) == 2 and {x["label"]: x["score"] for x in batch[1]} == pytest.approx(
            dict(zip(["negative", "neutral", "positive"], logits[1].tolist())), abs=1e-5)
        texts = c.post("/predict", json={"inputs": TEXTS[:3]}).json()
        want = hf_logits(folders["classifier"], texts=TEXTS[:3])
        assert [row[0]["label"] for row in texts] == [["negative", "neutral", "positive"][j] for j in want.argmax(1)]
        r = c.post("/rerank", json={"query": "q", "texts": ["a"]})
        assert r.status_code == 424 and "not a reranker model" in r.json()["error"]
        # TEI's root and SageMaker's /invocations route to /predict for a classifier: huggingface_hub's client
        from huggingface_hub import InferenceClient  # noqa: PLC0415

        top = InferenceClient(base_url=server.url).text_classification(TEXTS[0])
        top = top if not isinstance(top, list) else top[0]  # TEI's flat answer: the client takes its first element
        best = c.post("/predict", json={"inputs": TEXTS[0]}).json()[0]
        assert top.label == best["label"] and top.score == pytest.approx(best["score"])
        assert c.post("/invocations", json={"inputs": list(PAIRS[0])}).json() == one


def test_predict_takes_teis_batch_form_singles_and_pairs_mixed(folders):
    """TEI's PredictInput batch: a list of [text] and [text, text] entries, mixed, answered in order; each answer
    equal to the same input sent alone; errors name the entry's place in the request."""
    with ServerThread(create_app(settings(model={"path": str(folders["classifier"]), "name": "clf"}))) as server, \
            server.client() as c:
        inputs = [[TEXTS[0]], list(PAIRS[1]), [TEXTS[2]], list(PAIRS[3])]
        r = c.post("/predict", json={"inputs": inputs, "raw_scores": True})
        assert r.status_code == 200, r.text
        alone = [c.post("/predict", json={"inputs": x[0] if len(x) == 1 else x, "raw_scores": True}).json() for x in inputs]
        got = [{d["label"]: d["score"] for d in row} for row in r.json()]
        for g, a in zip(got, alone):
            assert g == pytest.approx({d["label"]: d["score"] for d in a}, abs=1e-5)
        pair_logits = hf_logits(folders["classifier"], pairs=[PAIRS[1]])[0]
        assert got[1] == pytest.approx(dict(zip(["negative", "neutral", "positive"], pair_logits.tolist())), abs=1e-5)
        assert got[0] != pytest.approx(got[2], abs=1e-3)  # different texts, different scores: not one answer repeated
        bare = [TEXTS[0], list(PAIRS[1]), TEXTS[2]]  # plain texts among the entries (the README's "mixed")
        r = c.post("/predict", json={"inputs": bare, "raw_scores": True})
        assert r.status_code == 200, r.text
        for row, want in zip(r.json(), got[:3], strict=True):
            assert {d["label"]: d["score"] for d in row} == pytest.approx(want, abs=1e-5)
        r = c.post("/predict", json={"inputs": [["a"], ["b", "c", "d"]]})
        assert r.status_code == 422 and "input 1" in r.json()["error"]
        r = c.post("/predict", json={"inputs": [["a"], ["b", ""]]})
        assert r.status_code == 400 and "pair 1" in r.json()["error"], r.text  # TEI: error_type Empty, 400
        r = c.post("/predict", json={"inputs": [["b", "c"], ["word " * 600]]})
        assert r.status_code == 413 and "input 1" in r.json()["error"], r.text


def test_root_routes_a_query_body_to_rerank(reranker):
    for path in ("/", "/invocations"):
        got = reranker.post(path, json={"query": QUERY, "texts": TEXTS})
        want = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
        # the same ranking; scores equal up to float rounding (the two requests may be batched apart differently)
        assert got.status_code == 200 and [r["index"] for r in got.json()] == [r["index"] for r in want]
        assert [r["score"] for r in got.json()] == pytest.approx([r["score"] for r in want], rel=1e-6)
    r = reranker.post("/", json={"inputs": "x"})  # /predict on a re-ranker: its one label's sigmoid score
    assert r.status_code == 200 and r.json()[0]["label"] == "LABEL_0"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_cuda_code_path_scores_pairs_on_the_emulator(folders, dtype):
    """Token types of pairs and the head on the encoder's CUDA path (kernels on the CPU emulator)."""
    from kernels import cuda, emulate  # noqa: PLC0415

    if emulate.compiler() is None:
        pytest.skip("no C++ compiler for the emulator")
    embedder, tokenizer, _ = load_model(str(folders["bert"]))
    encoded = tokenizer.encode_pairs(PAIRS)
    want = embedder.embed([e.ids for e in encoded], segments=[e.segment for e in encoded])
    with cuda.emulation():
        half, _, _ = load_model(str(folders["bert"]), dtype=dtype)
        got = half.embed([e.ids for e in encoded], segments=[e.segment for e in encoded])
    np.testing.assert_allclose(got, want, atol=5e-3)


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_vllm_score_api_scores_pairs_in_order(reranker, path):
    tei = {x["index"]: x["score"] for x in reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()}
    r = reranker.post(path, json={"model": "ce", "text_1": QUERY, "text_2": TEXTS})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(TEXTS))) and all(d["object"] == "score" for d in data)
    assert [d["score"] for d in data] == pytest.approx([tei[i] for i in range(len(TEXTS))])
    zipped = reranker.post(path, json={"text_1": [QUERY, QUERY], "text_2": TEXTS[:2]}).json()["data"]
    assert [d["score"] for d in zipped] == pytest.approx([tei[0], tei[1]])
    r = reranker.post(path, json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert r.status_code == 400 and "text_1 has 2 texts" in r.json()["error"]["message"]


def test_coheres_own_clients_rerank(reranker):
    """cohere.Client posts to /v1/rerank, cohere.ClientV2 to /v2/rerank: both read our answers."""
    import cohere  # noqa: PLC0415

    url = str(reranker.base_url).rstrip("/")
    tei = reranker.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    for client in (cohere.Client(base_url=url, api_key="unused"), cohere.ClientV2(base_url=url, api_key="unused")):
        got = client.rerank(model="ce", query=QUERY, documents=TEXTS, top_n=3).results
        assert [x.index for x in got] == [x["index"] for x in tei[:3]]
        assert [x.relevance_score for x in got] == pytest.approx([x["score"] for x in tei[:3]])


@pytest.mark.slow
def test_schemathesis_against_a_reranker_no_5xx(reranker):
    """Every route of the OpenAPI spec against a re-ranker: the rerank routes' real handlers, and the embedding
    routes refusing: no 5xx, documented statuses and bodies."""
    from bench.fuzz import fuzz  # noqa: PLC0415

    reached: set[str] = set()
    failures = fuzz(str(reranker.base_url).rstrip("/"), max_examples=10, on_result=lambda label, status, failure: reached.add(label))
    assert not failures, "\n".join(failures)
    assert any("rerank" in label for label in reached) and any("predict" in label for label in reached)


def test_vllm_and_cohere_truncation_fields(reranker, folders):
    """vLLM's truncate_prompt_tokens cuts each pair to k tokens as transformers' tokenizer(a, b, truncation=True,
    max_length=k) does (-1: the model's limit; 0 or past it refused); Cohere's max_tokens_per_doc cuts each document
    before pairing it and the answer quotes the document whole; Cohere's /v2/rerank cuts long documents unless
    truncate is false (its documented max_tokens_per_doc default), where /v1/rerank refuses them as TEI does."""
    tf = import_transformers()
    tok = tf.AutoTokenizer.from_pretrained(folders["bert"])
    long_doc = "deep learning " * 400
    want_ids = tok(QUERY, long_doc, truncation=True, max_length=40)["input_ids"]
    r = reranker.post("/v1/score", json={"text_1": QUERY, "text_2": long_doc, "truncate_prompt_tokens": 40})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want_ids) == 40, r.text
    score = 1 / (1 + np.exp(-hf_logits(folders["bert"], pairs=[(QUERY, tok.decode(want_ids[len(tok(QUERY)["input_ids"]):-1]))])[0, 0]))
    assert r.json()["data"][0]["score"] == pytest.approx(float(score), abs=1e-4)
    assert reranker.post("/v1/score", json={"text_1": QUERY, "text_2": long_doc}).status_code == 413
    r = reranker.post("/v1/rerank", json={"query": QUERY, "documents": [long_doc], "truncate_prompt_tokens": -1})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 512
    for bad in (0, 513, -2):
        r = reranker.post("/v1/rerank", json={"query": QUERY, "documents": ["x"], "truncate_prompt_tokens": bad})
        assert r.status_code == 400 and "truncate_prompt_tokens" in r.json()["error"]["message"]
    docs = [long_doc, "Paris is the capital of France."]
    assert len(tok(docs[1], add_special_tokens=False)["input_ids"]) == 7  # under the cut: sent whole
    cut = reranker.post("/v1/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 8}).json()
    end = tok(long_doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][7][1]  # 8 tokens
    pre_cut = reranker.post("/v1/rerank", json={"query": QUERY, "documents": [long_doc[:end], docs[1]]}).json()
    assert [x["index"] for x in cut["results"]] == [x["index"] for x in pre_cut["results"]]
    assert [x["relevance_score"] for x in cut["results"]] == pytest.approx([x["relevance_score"] for x in pre_cut["results"]])
    assert {x["document"]["text"] for x in cut["results"]} == set(docs)  # quoted whole
    assert reranker.post("/v1/rerank", json={"query": QUERY, "documents": docs}).status_code == 413
    r = reranker.post("/v2/rerank", json={"query": QUERY, "documents": docs})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert reranker.post("/v2/rerank", json={"query": QUERY, "documents": docs, "truncate": False}).status_code == 413

