"""Text Embeddings Inference API: POST /embed, /embed_all, /embed_sparse, /similarity, /tokenize, /decode; GET
/info, /health; TEI's aliases (POST / and /invocations: /embed or /similarity, /embed_sparse for a SPLADE model,
or for a re-ranker / classifier /rerank or /predict, by body; GET / and /ping: the health check). A route that
does not fit the model answers 424, as TEI's do. /rerank and /predict: server/routes_rerank.py."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationError

import server
from models.runtime import finish_embedding
from scheduler.errors import NotReady
from server import routes_rerank, routes_vllm
from server.deps import Direction, TEIInputs, engine_of, engines_of, json_response, timing_of
from server.errors import EmptyInput, error_responses

router = APIRouter(tags=["tei"], responses=error_responses("tei"))




class EmbedRequest(BaseModel):
    inputs: TEIInputs = Field(description="Text, texts, or token ids (a batch may mix texts and id lists).")
    normalize: StrictBool = True
    truncate: StrictBool | None = Field(None, description="Cut inputs over max_input_length instead of refusing them (413).")
    truncation_direction: Direction = "right"
    dimensions: StrictInt | None = Field(None, ge=1)
    prompt_name: str | None = None


@router.post("/embed", response_model=list[list[float]])
async def embed(body: EmbedRequest, request: Request):
    return json_response(await embeddings(body, request))


async def embeddings(body: EmbedRequest, request: Request) -> np.ndarray:
    """/embed's answer, [n, dim] (also /vertex's for an embedding model)."""
    engine = engine_of(request)
    if body.normalize:
        engine.refuse_sparse("normalize")
    dimensions = engine.check_dimensions(body.dimensions)
    timing = timing_of(request)
    encoded = await engine.tokenize(body.inputs, timing, body.truncate, body.truncation_direction, body.prompt_name)
    return finish_embedding(await engine.run(encoded, request, timing), body.normalize, dimensions)


class EmbedAllRequest(BaseModel):
    inputs: TEIInputs = Field(description="Text, texts, or token ids (a batch may mix texts and id lists).")
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


@router.post("/embed_all", response_model=list[list[list[float]]])
async def embed_all(body: EmbedAllRequest, request: Request):
    """Every token's last hidden state (special tokens included, not normalised): [input][token][dim]."""
    engine = engine_of(request)
    engine.refuse_sparse("/embed_all")
    timing = timing_of(request)
    encoded = await engine.tokenize(body.inputs, timing, body.truncate, body.truncation_direction, body.prompt_name)
    return json_response(await engine.run(encoded, request, timing, per_token=True))


class SimilarityInput(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class SimilarityRequest(BaseModel):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


@router.post("/similarity", response_model=list[float])
async def similarity(body: SimilarityRequest, request: Request):
    """Cosine similarity of source_sentence to each of sentences, in their order."""
    engine = engine_of(request)
    engine.refuse_sparse("/similarity")
    params = body.parameters or SimilarityParameters()
    if not body.inputs.sentences:
        raise EmptyInput("sentences is empty: give at least one sentence to compare with")
    timing = timing_of(request)
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    encoded = await engine.tokenize(texts, timing, params.truncate, params.truncation_direction, params.prompt_name)
    vectors = finish_embedding(await engine.run(encoded, request, timing), True)
    return json_response(vectors[1:] @ vectors[0])


async def root(body: dict, request: Request):
    """TEI's root (and SageMaker's /invocations) route, by the model's kind: for an embedding model /embed, or
    /similarity when `inputs` is {source_sentence, sentences} (TEI serves that only under
    TASK=sentence-similarity; huggingface_hub's InferenceClient posts both feature_extraction and
    sentence_similarity here); for a re-ranker or classifier /rerank when the body has a `query`, else /predict
    (InferenceClient's text_classification). With a reranker beside the model (reranker.path), a body with a
    `query` is a /rerank."""
    try:
        if "query" in body and request.app.state.reranker is not None:
            return await routes_rerank.rerank(body, request)
        if engine_of(request).info.sparse:
            return await embed_sparse(EmbedSparseRequest.model_validate(body), request)
        if engine_of(request).info.kind == "embedding":
            if isinstance(body.get("inputs"), dict):
                return await similarity(SimilarityRequest.model_validate(body), request)
            return await embed(EmbedRequest.model_validate(body), request)
        if "query" in body:
            return await routes_rerank.rerank(body, request)
        return await routes_rerank.predict(routes_rerank.PredictRequest.model_validate(body), request)
    except ValidationError as exc:  # the same 422 as a body FastAPI validates itself
        raise RequestValidationError(exc.errors()) from None


for _path in ("/", "/invocations"):  # kept out of the schema: the same operations as /embed and /similarity
    router.add_api_route(_path, root, methods=["POST"], include_in_schema=False)


class TokenizeRequest(BaseModel):
    inputs: str | list[str]
    add_special_tokens: StrictBool = True
    prompt_name: str | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


@router.post("/tokenize", response_model=list[list[SimpleToken]] | routes_vllm.VllmTokenizeResponse)
async def tokenize(body: TokenizeRequest | routes_vllm.VllmTokenizeRequest, request: Request):
    """The tokens of each input, with their character offsets; no model work, no truncation. vLLM's body
    (`prompt`) gets vLLM's answer ({count, max_model_len, tokens, token_strs})."""
    if isinstance(body, routes_vllm.VllmTokenizeRequest):
        return await routes_vllm.tokenize(body, request)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    return json_response(await engine_of(request).describe(texts, body.add_special_tokens, body.prompt_name))


class DecodeRequest(BaseModel):
    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: StrictBool = True


@router.post("/decode", response_model=list[str])
async def decode(body: DecodeRequest, request: Request):
    """The text of each list of token ids."""
    engine = engine_of(request)
    sequences = [body.ids] if not body.ids or isinstance(body.ids[0], int) else body.ids
    engine.check_batch(len(sequences))
    return json_response(engine.tokenizer.decode(sequences, body.skip_special_tokens))  # type: ignore[arg-type]


class EmbedSparseRequest(BaseModel):
    inputs: TEIInputs = Field(description="Text, texts, or token ids (a batch may mix texts and id lists).")
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class SparseValue(BaseModel):
    index: int
    value: float


@router.post("/embed_sparse", response_model=list[list[SparseValue]])
async def embed_sparse(body: EmbedSparseRequest, request: Request):
    """A SPLADE model's sparse vectors: per input, its non-zero weights as {index (vocabulary id), value}, by
    index. 424 for a model without SPLADE pooling, as TEI."""
    return json_response(await sparse_embeddings(body, request))


async def sparse_embeddings(body: EmbedSparseRequest, request: Request) -> list[list[dict]]:
    """/embed_sparse's answer (also /vertex's for a SPLADE model)."""
    engine = engine_of(request)
    engine.require_sparse()
    timing = timing_of(request)
    encoded = await engine.tokenize(body.inputs, timing, body.truncate, body.truncation_direction, body.prompt_name)
    return [sparse_entries(row) for row in await engine.run(encoded, request, timing)]


def sparse_entries(row: np.ndarray) -> list[dict]:
    """A SPLADE vector's non-zero weights, {index, value} by index (HTTP and gRPC). The values stay numpy float32:
    written as the shortest digits that read back to the same float32, as TEI writes them."""
    return [{"index": int(i), "value": row[i]} for i in np.flatnonzero(row)]


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    scheduler: dict | None = None


def _model_type(info) -> dict:
    """TEI's model_type: {"embedding": {pooling}}, or {"reranker" | "classifier": {id2label, label2id}}."""
    if info.kind == "embedding":
        return {"embedding": {"pooling": info.pooling}}
    return {info.kind: {"id2label": {str(i): name for i, name in enumerate(info.labels)},
                        "label2id": {name: i for i, name in enumerate(info.labels)}}}


@router.get("/info", response_model=Info)
async def info(request: Request):
    engine = engine_of(request)
    s = engine.settings
    return {
        "model_id": engine.info.name,
        "model_sha": None,
        "model_dtype": engine.info.dtype,
        "model_type": _model_type(engine.info),
        "max_concurrent_requests": s.scheduler.max_queue_size,
        "max_input_length": engine.info.max_input_length,
        "max_batch_tokens": s.scheduler.max_batch_tokens,
        "max_batch_requests": s.scheduler.max_batch_requests,
        "max_client_batch_size": s.server.max_client_batch_size,
        "auto_truncate": s.model.auto_truncate,
        "tokenization_workers": 1,
        "version": server.__version__,
        "scheduler": engine.scheduler_info(),
    }


@router.get("/health")
async def health(request: Request):
    """200 when the model (and the reranker, when one is served) is loaded and its worker runs; 503 otherwise."""
    if not all(engine.healthy for engine in engines_of(request)):
        raise NotReady("the batching worker has stopped")
    return json_response({"status": "ok"})


router.add_api_route("/", health, methods=["GET"], include_in_schema=False)  # TEI's root health check
router.add_api_route("/ping", health, methods=["GET"], include_in_schema=False)  # SageMaker's
