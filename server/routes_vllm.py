"""vLLM's utility routes beside its pooling APIs: POST /tokenize with vLLM's body (`prompt`; TEI's body, `inputs`,
goes to TEI's answer on the same path, server/routes_tei.py), POST /detokenize, GET /version. Errors are OpenAI-
shaped on /detokenize, as vLLM's; /tokenize keeps TEI's error shape (its path is TEI's)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool, StrictInt

import server
from server.deps import engine_of, json_response
from server.errors import error_responses

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
