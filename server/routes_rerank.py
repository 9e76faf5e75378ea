"""Cross-encoders and sequence classifiers: TEI's POST /rerank and /predict, the Cohere / Jina / vLLM style
POST /v1/rerank (also /rerank when the body has `documents`), vLLM's POST /score and /v1/score, and vLLM's
POST /classify and /v1/classify (TEI's /v1/classify and SGLang's answer the same shape). A re-ranker
is a classifier with one label: its score is the sigmoid of the logit (raw_scores: the logit); a classifier's
scores are the softmax over its labels. The pairs go through the same scheduler as embeddings (the logits are
what the batch computes)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationError

from server.deps import Direction, engine_for, json_response, timing_of
from server.engine import Engine
from server.errors import EmptyInput, InvalidRequest, error_responses

router = APIRouter(tags=["rerank"], responses=error_responses("tei"))
v1_router = APIRouter(tags=["rerank"], responses=error_responses("openai"))  # /v1/...: OpenAI-style error bodies


def _scores(logits: np.ndarray, raw: bool) -> np.ndarray:
    """[n, labels] logits -> scores: as they are (raw), sigmoid for one label, softmax over several."""
    logits = logits.astype(np.float64)
    if raw:
        return logits
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class TEIRerankRequest(BaseModel):
    query: str
    texts: list[str] = Field(description="The texts to score against the query.")
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    raw_scores: StrictBool = False
    return_text: StrictBool = False


class CohereRerankRequest(BaseModel):
    model: str | None = None
    query: str
    documents: list[str | dict] = Field(description="Texts, or objects with a `text` field.")
    top_n: StrictInt | None = Field(None, ge=0, description="The best n results (all when absent or 0).")
    return_documents: StrictBool = True
    truncate: StrictBool | None = None
    max_tokens_per_doc: StrictInt | None = Field(None, ge=1, description="Cohere's: cut each document to this many tokens "
                                                 "before pairing it with the query (truncation implied).")
    truncate_prompt_tokens: StrictInt | None = Field(None, description="vLLM's: cut each (query, document) pair to this many tokens.")
    raw_scores: StrictBool | None = Field(None, description="infinity's: relevance_score is the logit, not its sigmoid.")


async def _rank(request: Request, query: str, texts: list[str], truncate: bool | None, direction: str,
                limit: int | None = None) -> tuple[np.ndarray, int]:
    """(relevance logits [n], tokens) of each text against the query (limit: as Engine.tokenize_pairs's)."""
    engine = engine_for(request, "reranker")
    engine.require("reranker")
    if not query:
        raise EmptyInput("the query is an empty string")
    timing = timing_of(request)
    encoded = await engine.tokenize_pairs([(query, t) for t in texts], timing, truncate, direction,  # type: ignore[arg-type]
                                          limit=limit)
    logits = await engine.run(encoded, request, timing)
    return logits[:, 0], sum(len(e.ids) for e in encoded)


@router.post("/rerank")
async def rerank(body: dict, request: Request):
    """TEI's body (query, texts) gets TEI's answer: [{index, score, text?}] best first; a body with `documents`
    (Cohere, Jina, vLLM) gets theirs, as /v1/rerank; one that also has `raw_scores` (infinity's client sends it,
    the others have no such field) gets infinity's: each document a plain string, `object` and `created`."""
    try:
        if "documents" in body and "texts" not in body:
            return await cohere_rerank(CohereRerankRequest.model_validate(body), request, infinity="raw_scores" in body)
        tei = TEIRerankRequest.model_validate(body)
    except ValidationError as exc:  # the same 422 / 400 as a body FastAPI validates itself
        raise RequestValidationError(exc.errors()) from None
    return json_response(await ranks(tei, request))


async def ranks(tei: TEIRerankRequest, request: Request) -> list[dict]:
    """TEI's /rerank answer (also /vertex's for an instance with query and texts)."""
    logits, _ = await _rank(request, tei.query, tei.texts, tei.truncate, tei.truncation_direction)
    return ranked(logits, tei.texts, tei.raw_scores, tei.return_text)


def ranked(logits: np.ndarray, texts: list[str], raw: bool, return_text: bool) -> list[dict]:
    """[{index, score, text?}] best first from each text's relevance logit (HTTP and gRPC)."""
    scores = _scores(logits[:, None], raw)[:, 0]
    return [{"index": int(i), "score": float(scores[i]), **({"text": texts[i]} if return_text else {})}
            for i in np.argsort(-scores, kind="stable")]


def labelled(logits: np.ndarray, labels: tuple[str, ...], raw: bool) -> list[list[dict]]:
    """Per input, [{score, label}] best first (softmax over the labels, sigmoid for one; raw: the logits)."""
    return [[{"score": float(row[j]), "label": labels[j]} for j in np.argsort(-row, kind="stable")]
            for row in _scores(logits, raw)]


@v1_router.post("/v1/rerank")
async def rerank_v1(body: CohereRerankRequest, request: Request):
    """{results: [{index, relevance_score, document: {text}}], best first, top_n of them; model, usage}."""
    return await cohere_rerank(body, request)


async def cohere_rerank(body: CohereRerankRequest, request: Request, infinity: bool = False):
    """/v1/rerank's answer; infinity: in infinity's shape (documents as plain strings, object, created)."""
    texts = []
    for i, doc in enumerate(body.documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise InvalidRequest(f"document {i} must be a string or an object with a string `text`")
        texts.append(text)
    engine = engine_for(request, "reranker")
    engine.check_model(body.model)
    limit = engine.prompt_limit(body.truncate_prompt_tokens)
    truncate, paired = body.truncate, texts
    if body.max_tokens_per_doc is not None:  # the documents cut, then paired; the answer quotes them whole
        paired = engine.tokenizer.first_tokens(texts, body.max_tokens_per_doc) if texts else texts
        truncate = True if truncate is None else truncate
    logits, tokens = await _rank(request, body.query, paired, truncate, "right", limit)
    scores = _scores(logits[:, None], bool(body.raw_scores))[:, 0]
    order = np.argsort(-scores, kind="stable")[: body.top_n or None]
    results = [{"index": int(i), "relevance_score": float(scores[i]),
                **({"document": texts[i] if infinity else {"text": texts[i]}} if body.return_documents else {})}
               for i in order]
    answer = {"id": f"rerank-{uuid.uuid4().hex}", "model": engine.info.name, "results": results,
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # infinity's client needs prompt_tokens
    return json_response({**answer, "object": "rerank", "created": int(time.time())} if infinity else answer)


class PredictRequest(BaseModel):
    inputs: str | list[str | list[str]] = Field(
        description="A text, a [text, text] pair, or a list of texts, [text]s or pairs, singles and pairs mixed (TEI's "
                    "reading: two strings are one pair).")
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    raw_scores: StrictBool = False


@router.post("/predict")
async def predict(body: PredictRequest, request: Request):
    """Label scores, best first: [{score, label}] for one input, a list of those for several."""
    return json_response(await predictions(body, request))


async def predictions(body: PredictRequest, request: Request) -> list:
    """/predict's answer (also /vertex's for a classifier or re-ranker)."""
    engine = engine_for(request, "classifier", "reranker")
    engine.require("classifier", "reranker")
    single = isinstance(body.inputs, str) or (len(body.inputs) == 2 and all(isinstance(x, str) for x in body.inputs))
    items: list[str | tuple[str, str]] = []
    for i, item in enumerate([body.inputs] if single else body.inputs):
        if isinstance(item, str):
            items.append(item)
        elif len(item) in (1, 2):  # TEI's batch entries: [text] or [text, text]
            items.append(item[0] if len(item) == 1 else (item[0], item[1]))
        else:
            raise InvalidRequest(f"input {i} must be a text, [text] or a pair [text, text]; got a list of {len(item)}")
    engine.check_batch(len(items))
    timing = timing_of(request)
    at_pairs = [i for i, item in enumerate(items) if isinstance(item, tuple)]
    at_texts = [i for i, item in enumerate(items) if isinstance(item, str)]
    by_place: dict[int, object] = {}
    if at_pairs:
        pairs = await engine.tokenize_pairs([items[i] for i in at_pairs], timing, body.truncate,  # type: ignore[misc]
                                            body.truncation_direction, at_pairs)
        by_place.update(zip(at_pairs, pairs))
    if at_texts:
        texts = await engine.tokenize([items[i] for i in at_texts], timing, body.truncate,  # type: ignore[misc]
                                      body.truncation_direction, kinds=("classifier", "reranker"), positions=at_texts)
        by_place.update(zip(at_texts, texts))
    encoded = [by_place[i] for i in range(len(items))]
    answers = labelled(await engine.run(encoded, request, timing), engine.info.labels, body.raw_scores)
    return answers[0] if single else answers


class ScoreRequest(BaseModel):
    model: str | None = None
    text_1: str | list[str] = Field(description="A text scored against every text_2, or one text a text_2.")
    text_2: str | list[str]
    truncate: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = Field(None, description="vLLM's: cut each pair to this many tokens.")


async def score(body: ScoreRequest, request: Request):
    """vLLM's score API: {data: [{index, object: "score", score}], usage}, the sigmoid score of each
    (text_1, text_2) pair in the order given."""
    engine = engine_for(request, "reranker")
    engine.check_model(body.model)
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise InvalidRequest(f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, or as many as text_2")
    engine.require("reranker")
    timing = timing_of(request)
    encoded = await engine.tokenize_pairs(list(zip(firsts, seconds)), timing, body.truncate,
                                          limit=engine.prompt_limit(body.truncate_prompt_tokens))
    scores = _scores(await engine.run(encoded, request, timing), False)[:, 0]
    tokens = sum(len(e.ids) for e in encoded)
    return json_response({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                          "model": engine.info.name,
                          "data": [{"index": i, "object": "score", "score": float(x)} for i, x in enumerate(scores)],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str] = Field(description="A text, or texts, to classify.")
    truncate: StrictBool | None = Field(None, description="Cut inputs over max_input_length instead of refusing them.")
    truncate_prompt_tokens: StrictInt | None = Field(None, description="vLLM's: cut each input to this many tokens.")


async def classify(body: ClassifyRequest, request: Request):
    """vLLM's classification API: per input the most probable label, the probabilities over every label (softmax;
    the sigmoid for a one-label model, as vLLM) and num_classes, in input order; usage in tokens."""
    engine = engine_for(request, "classifier", "reranker")
    engine.check_model(body.model)
    probs, tokens = await probabilities(engine, request, body.input, body.truncate, body.truncate_prompt_tokens)
    labels = engine.info.labels
    data = [{"index": i, "label": labels[int(np.argmax(row))], "probs": row.astype(np.float32), "num_classes": len(row)}
            for i, row in enumerate(probs)]
    return json_response({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                          "model": engine.info.name, "data": data,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                    "prompt_tokens_details": None}})


async def probabilities(engine: Engine, request: Request, inputs, truncate: bool | None, truncate_prompt_tokens: int | None,
                        raw: bool = False, direction: Literal["right", "left"] = "right") -> tuple[np.ndarray, int]:
    """([n, labels] scores, tokens) of each input (a text or token ids) as /v1/classify answers them (also vLLM's
    /pooling): the softmax over the labels, the sigmoid for a one-label model; raw: the logits."""
    timing = timing_of(request)
    encoded = await engine.tokenize(inputs, timing, truncate, direction, kinds=("classifier", "reranker"),
                                    limit=engine.prompt_limit(truncate_prompt_tokens))
    return _scores(await engine.run(encoded, request, timing), raw), sum(len(e.ids) for e in encoded)


v1_router.add_api_route("/v1/classify", classify, methods=["POST"])
v1_router.add_api_route("/classify", classify, methods=["POST"], include_in_schema=False)  # vLLM's path; OpenAI-style errors
v1_router.add_api_route("/v1/score", score, methods=["POST"])


async def rerank_v2(body: CohereRerankRequest, request: Request):
    """Cohere's v2 rerank: as /v1/rerank, but documents too long are cut, not refused, unless `truncate` is false
    (Cohere v2 cuts every document to max_tokens_per_doc, 4096 by default, and the pair to the model's context)."""
    if body.truncate is None:
        body = body.model_copy(update={"truncate": True})
    return await cohere_rerank(body, request)


# Cohere's v2 client (and vLLM) post to /v2/rerank; under /v2 errors are KServe-shaped ({"error": ...}).
v1_router.add_api_route("/v2/rerank", rerank_v2, methods=["POST"], include_in_schema=False)
v1_router.add_api_route("/score", score, methods=["POST"], include_in_schema=False)  # vLLM's alias; OpenAI-style errors
