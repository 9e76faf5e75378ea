"""`turboserve serve` with TURBOSERVE_EMULATE_CUDA=1 and model.dtype float16 or bfloat16: the server's CUDA code
path (fused kernels run by the CPU emulator, half-precision weights, nested attention, the memory arena planned
for that path, hidden states copied out as float32) answers the TEI and OpenAI routes like sentence-transformers."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import numpy as np
import pytest
from openai import OpenAI

from kernels import emulate
from models.config import default_model_path
from tests.processes import free_port
from tests.support import BIN, wait_healthy

TEXTS = ["What is Deep Learning?", "The quick brown fox jumps over the lazy dog. " * 6, "a", "Ünïcödé, with punctuation!?"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_serve_runs_the_cuda_code_path_on_the_emulator(tmp_path, dtype):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TURBOSERVE_EMULATE_CUDA": "1", "TURBOSERVE_MODEL__DTYPE": dtype,
           # a small profile: every forward goes through the emulator
           "TURBOSERVE_SCHEDULER__MAX_BATCH_REQUESTS": "4", "TURBOSERVE_SCHEDULER__PROFILE_MAX_TOKENS": "16",
           "TURBOSERVE_SCHEDULER__PROFILE_RUNS": "1", "TURBOSERVE_SCHEDULER__COST_MODEL_DIR": str(tmp_path)}
    proc = subprocess.Popen([str(BIN), "serve", "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout=240)
        st = SentenceTransformer(str(default_model_path()), device="cpu")
        with httpx.Client(base_url=url, timeout=120) as c:
            got = np.array(c.post("/embed", json={"inputs": TEXTS}).json())
            assert cosine_rows(got, st.encode(TEXTS)).min() >= 0.999
            per_token = c.post("/embed_all", json={"inputs": TEXTS[:2]}).json()
            for g, w in zip(per_token, st.encode(TEXTS[:2], output_value="token_embeddings")):
                assert np.array(g).shape == tuple(w.shape) and cosine_rows(np.array(g), w.numpy()).min() >= 0.999
            assert c.get("/info").json()["model_dtype"] == dtype
        data = OpenAI(base_url=f"{url}/v1", api_key="unused").embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS).data
        assert cosine_rows(np.array([d.embedding for d in data]), st.encode(TEXTS)).min() >= 0.999
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        text = log.read_text()
        assert "CUDA code path runs on the CPU emulator" in text and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
