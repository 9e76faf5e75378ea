"""200 concurrent mixed-length requests on the real model: every one answered with the embedding it
would get alone, whichever API it came through."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest

from models.runtime import finish_embedding


def _texts(tokenizer, count: int) -> list[str]:
    vocab = sorted(w for w in tokenizer._full.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    rng = random.Random(7)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 200))) for _ in range(count)]


async def _send(client: httpx.AsyncClient, i: int, text: str, model: str) -> np.ndarray:
    route = i % 3
    if route == 0:
        r = await client.post("/embed", json={"inputs": text})
        assert r.status_code == 200, r.text
        return np.array(r.json()[0])
    if route == 1:
        r = await client.post("/v1/embeddings", json={"input": text, "model": model, "encoding_format": "float"})
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"])
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    r = await client.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    return np.array(r.json()["outputs"][0]["data"])


@pytest.mark.slow
def test_200_concurrent_requests_match_unbatched(real_server):
    engine = real_server.app.state.engine
    texts = _texts(engine.tokenizer, 200)
    ids = [e.ids for e in engine.tokenizer.encode(texts)]
    alone = np.stack([finish_embedding(engine.embedder.embed([x])[0], True) for x in ids])

    async def fire():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=real_server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_send(client, i, t, engine.info.name) for i, t in enumerate(texts)))

    batches_before = real_server.app.state.metrics.registry.get_sample_value("turboserve_batch_size_count") or 0
    got = np.stack(asyncio.run(fire()))
    assert got.shape == (200, 384)
    np.testing.assert_allclose(got, alone, atol=2e-5)
    batches = real_server.app.state.metrics.registry.get_sample_value("turboserve_batch_size_count") - batches_before
    assert batches < 200  # requests really were batched together
