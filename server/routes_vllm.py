"""vLLM's Pooling API (POST /pooling) and its utility routes beside its pooling APIs: POST /tokenize with vLLM's body
(`prompt`; TEI's body, `inputs`, goes to TEI's answer on the same path, server/routes_tei.py), POST /detokenize,
GET /version. Errors are OpenAI-shaped on /pooling and /detokenize, as vLLM's; /tokenize keeps TEI's error shape (its
path is TEI's)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

import server
from server.deps import OpenAIInputs, engine_of, engines_of, json_response, timing_of
from server.engine import Engine
from server.errors import InvalidRequest, ModelNotFound, WrongModelKind, error_responses
from server.routes_openai import base64_of, embedding_vectors
from server.routes_rerank import probabilities

router = APIRouter(tags=["vllm"], responses=error_responses("openai"))


class VllmTokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str = Field(description="The text to tokenize (vLLM's body).")
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


async def tokenize(body: VllmTokenizeRequest, request: Request):
    """{count, max_model_len, tokens, token_strs}: the ids of the prompt (no truncation), as vLLM answers."""
    engine = engine_of(request)
    engine.check_model(body.model)
    ids, strs = engine.tokenizer.pieces(body.prompt, body.add_special_tokens)
    return json_response({"count": len(ids), "max_model_len": engine.info.max_input_length, "tokens": ids,
                          "token_strs": strs if body.return_token_strs else None})


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(description="Token ids.")


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """{prompt}: the text of the ids (special tokens kept, as vLLM decodes them)."""
    engine = engine_of(request)
    engine.check_model(body.model)
    return json_response({"prompt": engine.tokenizer.decode([body.tokens], skip_special_tokens=False)[0]})


@router.get("/version")
async def version():
    return {"version": server.__version__}


# vLLM's pooling tasks (vllm/tasks.py) and the ones it removed, with its messages for them.
VLLM_TASKS = ("embed", "classify", "token_embed", "token_classify", "plugin", "embed&token_classify")
REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                 "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead."}
# vLLM's older switches for use_activation (vLLM 0.11's PoolingParams), and the tasks each applies to.
ACTIVATION_ALIASES = {"normalize": ("embed", "token_embed"), "softmax": ("classify",), "activation": ("classify",)}
EMBED_DTYPES = {"float32": "f4", "float16": "f2"}
BYTE_ORDERS = {"native": "=", "little": "<", "big": ">"}


class PoolingRequest(BaseModel):
    """vLLM's PoolingCompletionRequest; its chat form (`messages`) and plugin form (`data`) are refused by name."""

    model: str | None = None
    input: OpenAIInputs | None = Field(None, description="Text, texts, token ids, or lists of token ids (ids used as given).")
    task: StrictStr | None = Field(None, description="embed | token_embed (an embedding model) or classify (a classifier "
                                   "or re-ranker); default: the model's own (embed, or classify).")
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] | None = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "little", "big"] = "native"
    dimensions: StrictInt | None = Field(None, ge=0, description="Matryoshka size for embed / token_embed (0: the full size).")
    truncate_prompt_tokens: StrictInt | None = Field(None, description="Cut each input to this many tokens (-1: the "
                                                     "model's limit).")
    truncation_side: Literal["left", "right"] | None = None
    use_activation: StrictBool | None = Field(None, description="Normalise (embed tasks) / softmax or sigmoid (classify); "
                                              "default true.")
    normalize: StrictBool | None = Field(None, description="vLLM 0.11's use_activation for embed tasks.")
    softmax: StrictBool | None = Field(None, description="vLLM 0.11's use_activation for classify.")
    activation: StrictBool | None = Field(None, description="vLLM 0.11's use_activation for classify.")
    add_special_tokens: StrictBool = True
    padding: Literal["max_length", "do_not_pad"] | None = None
    priority: StrictInt = 0
    user: str | None = None
    messages: Any = Field(None, description="vLLM's chat form: not served (400).")
    data: Any = Field(None, description="vLLM's IO-processor plugin form: not served (400).")


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage


def served_tasks(engine: Engine) -> tuple[str, ...]:
    """The pooling tasks a model answers here, its default first (vLLM's order)."""
    if engine.info.kind != "embedding":
        return ("classify",)  # logits come from the pooled sequence only: no token_classify
    return () if engine.info.sparse else ("embed", "token_embed")


def _pooling_engine(request: Request, model: str | None, task: str | None) -> Engine:
    """The engine `model` names (any, when None), the one serving `task` first (a re-ranker served beside the model)."""
    engines = engines_of(request)
    for engine in sorted(engines, key=lambda e: task is not None and task not in served_tasks(e)):
        try:
            engine.check_model(model)
        except ModelNotFound:
            continue
        return engine
    raise ModelNotFound(f"model {model!r} is not served here; this server serves "
                        f"{', '.join(repr(e.info.name) for e in engines)}")


def _check_task(engine: Engine, task: str | None) -> str:
    """The task to run (the model's default when None), or a 400 naming what the model serves."""
    if task in REMOVED_TASKS:
        raise InvalidRequest(REMOVED_TASKS[task])
    if task is not None and task not in VLLM_TASKS:
        raise InvalidRequest(f"unknown task {task!r}: vLLM's pooling tasks are {', '.join(VLLM_TASKS)}")
    tasks = served_tasks(engine)
    if not tasks:
        raise WrongModelKind("this server serves a sparse (SPLADE) embedding model: its vectors come from /embed_sparse")
    if task is None or task in tasks:
        return task or tasks[0]
    why = ": no IO-processor plugin runs here" if task == "plugin" else ""
    if "token_classify" in task and engine.info.kind != "embedding":
        why = ": a classifier's logits are computed from the pooled sequence only, not per token"
    kind = f"{'an' if engine.info.kind == 'embedding' else 'a'} {engine.info.kind} model"
    raise WrongModelKind(f"Unsupported task: {task!r}{why}. Model {engine.info.name!r} ({kind}) supports {', '.join(tasks)}")


def _activation(body: PoolingRequest, task: str) -> bool | None:
    """use_activation, or one of vLLM 0.11's names for it that applies to `task` (a 400 for one that does not, or two
    that disagree); None: the default."""
    given = {"use_activation": body.use_activation}
    for name, tasks in ACTIVATION_ALIASES.items():
        if getattr(body, name) is not None:
            if task not in tasks:
                raise InvalidRequest(f"`{name}` does not apply to task {task!r}; use `use_activation`")
            given[name] = getattr(body, name)
    values = {v for v in given.values() if v is not None}
    if len(values) > 1:
        raise InvalidRequest(f"{' and '.join(k for k, v in given.items() if v is not None)} disagree; give use_activation only")
    return values.pop() if values else None


def _refuse_unserved(body: PoolingRequest) -> None:
    """400 for what vLLM's body can ask and this server does not do, naming it (never ignored silently)."""
    if body.messages is not None:
        raise InvalidRequest("chat input (`messages`) is not served on /pooling here: apply the model's chat template "
                             "yourself and send the text as `input`")
    if body.data is not None:
        raise InvalidRequest("IO-processor plugin requests (`data`) are not served here: send `input`")
    if body.input is None:
        raise InvalidRequest("input is required: a text, texts, token ids, or lists of token ids")
    if body.encoding_format in ("bytes", "bytes_only"):
        raise InvalidRequest(f"encoding_format {body.encoding_format!r} is not served here: use float or base64")
    if body.encoding_format == "base64" and body.embed_dtype not in EMBED_DTYPES:
        raise InvalidRequest(f"embed_dtype {body.embed_dtype!r} is not served here: use {' or '.join(EMBED_DTYPES)}")
    if not body.add_special_tokens:
        raise InvalidRequest("add_special_tokens false is not served here: send token ids, which are used as given")
    if body.padding == "max_length":
        raise InvalidRequest("padding 'max_length' is not served here: inputs are never padded")
    if body.priority:
        raise InvalidRequest("priority in the body is not served here: use the x-priority header (higher runs first)")


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(body: PoolingRequest, request: Request):
    """vLLM's Pooling API: per input, what the model's task gives (embed: the vector /v1/embeddings gives; token_embed:
    every token's vector, [tokens][dim]; classify: the probabilities /v1/classify gives), as `data`, with usage."""
    _refuse_unserved(body)
    engine = _pooling_engine(request, body.model, body.task)
    task = _check_task(engine, body.task)
    activation = _activation(body, task)
    direction = body.truncation_side or "right"
    if task == "classify":
        if body.dimensions:
            raise InvalidRequest("dimensions applies to the embed and token_embed tasks, not classify")
        rows, tokens = await probabilities(engine, request, body.input, None, body.truncate_prompt_tokens,
                                           raw=activation is False, direction=direction)
        rows = rows.astype(np.float32)
    else:
        if task == "token_embed" and getattr(engine.embedder, "dense", None):
            raise WrongModelKind("token_embed is not served for a model with Dense modules after its pooling: the per-token "
                                 "states here are the encoder's, before the projection vLLM applies to them")
        rows = await embedding_vectors(engine, request, body.input, body.dimensions, activation,
                                       body.truncate_prompt_tokens, direction, per_token=task == "token_embed")
        tokens = timing_of(request).tokens
    if body.encoding_format == "base64":
        dtype = BYTE_ORDERS[body.endianness] + EMBED_DTYPES[body.embed_dtype]
        rows = [base64_of(row, dtype) for row in rows]
    return json_response({"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                          "model": engine.info.name,
                          "data": [{"index": i, "object": "pooling", "data": row} for i, row in enumerate(rows)],
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
