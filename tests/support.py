"""Test support: a small deterministic engine (after infinity's DummyTransformer) and a real uvicorn
server on a free loopback port, run in a thread so tests can reach into the app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from configs.settings import Settings, load_settings
from models.config import default_model_path
from models.runtime import ModelInfo
from models.tokenizer import TextTokenizer
from server.app import create_app

MODEL = "dummy"


class DummyEmbedder:
    """Deterministic, batch-invariant vectors from token ids; can be gated or made to fail."""

    def __init__(self, dim: int = 8, delay_s: float = 0.0):
        self.dim = dim
        self.delay_s = delay_s  # a fixed time a batch, for tests that need batch timings stable
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch starts (then waits on the gate)
        self.fail_next = False

    def occupy(self, pool, client, text: str = "blocker"):
        """Post `text` to /embed from `pool` and return its future once its batch holds the worker (waiting on
        the gate): whatever is sent next waits in the queue until `gate.set()`."""
        self.gate.clear()
        self.entered.clear()
        future = pool.submit(client.post, "/embed", json={"inputs": text})
        assert self.entered.wait(10), "the worker never started the occupying batch"
        return future

    def embed(self, sequences: list[list[int]], per_token: list[bool] | None = None) -> np.ndarray | list[np.ndarray]:
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate was never opened")
        self.batches.append(sequences)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        pooled = np.stack([expected_vector(ids, self.dim) for ids in sequences])
        if not per_token or not any(per_token):
            return pooled
        return [expected_states(ids, self.dim) if flag else row for ids, row, flag in zip(sequences, pooled, per_token)]


def expected_states(ids: list[int], dim: int = 8) -> np.ndarray:
    """DummyEmbedder's per-token states of one sequence ([tokens, dim]); their mean is expected_vector."""
    tokens = np.asarray(ids, dtype=np.float64)[:, None]
    j = np.arange(1, dim + 1, dtype=np.float64)[None, :]
    return (np.cos(tokens * j * 0.01) + 0.1).astype(np.float32)


def expected_vector(ids: list[int], dim: int = 8) -> np.ndarray:
    """What DummyEmbedder returns (pooled, before normalisation) for one sequence."""
    tokens = np.asarray(ids, dtype=np.float64)[:, None]
    j = np.arange(1, dim + 1, dtype=np.float64)[None, :]
    return np.cos(tokens * j * 0.01).mean(axis=0).astype(np.float32) + np.float32(0.1)


def dummy_loader(embedder: DummyEmbedder, max_length: int = 32, matryoshka: tuple[int, ...] = (4,),
                 ready: threading.Event | None = None):
    """A loader that serves DummyEmbedder with the embedded model's real tokenizer."""

    def load():
        if ready is not None:
            ready.wait(timeout=30)
        tokenizer = TextTokenizer(default_model_path() / "tokenizer.json", max_length, 30522)
        info = ModelInfo(MODEL, "dummy", "bert", embedder.dim, max_length, "mean", True, matryoshka, "float32", "cpu")
        return embedder, tokenizer, info

    return load


def settings(**sections: dict[str, Any]) -> Settings:
    base = {"server": {"port": 0}, "model": {"warmup": False},
            "scheduler": {"cost_model_dir": None, "profile_runs": 1, "profile_max_tokens": 256}}
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    return load_settings(None, base)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (free port) in a daemon thread."""

    def __init__(self, app, wait_ready: bool = True):
        self.app = app
        self.wait_ready = wait_ready
        from server.http_protocol import GuardedHttpToolsProtocol  # noqa: PLC0415 - the protocol `turboserve serve` runs

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    http=GuardedHttpToolsProtocol))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if self.wait_ready:
            self.app.state.loader_thread.join(timeout=120)
            if self.app.state.engine is None:
                raise RuntimeError(f"model did not load: {self.app.state.load_error}")
            embedder = getattr(self.app.state, "embedder", None)
            if embedder is not None:
                embedder.batches.clear()  # forget the cost-model profiling runs
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


def dummy_server(embedder: DummyEmbedder | None = None, wait_ready: bool = True, loader_kwargs: dict | None = None,
                 **sections: dict[str, Any]) -> ServerThread:
    embedder = embedder or DummyEmbedder()
    app = create_app(settings(**sections), dummy_loader(embedder, **(loader_kwargs or {})))
    app.state.embedder = embedder
    return ServerThread(app, wait_ready)


# -- the real `turboserve serve` as a subprocess ----------------------------------------------------------
BIN = Path(sys.executable).with_name("turboserve")


def spawn_server(config: Path, log: Path) -> subprocess.Popen:
    """`turboserve serve --config config`, its output appended to `log` (so restarts share one log)."""
    return subprocess.Popen([str(BIN), "serve", "--config", str(config)], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    """Poll GET /health until 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as c:
        while True:
            try:
                if c.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"server did not become healthy:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)


def stop_load_and_processes(stop: threading.Event, threads, procs) -> None:
    """End a multi-process test: signal the load threads, join them, then terminate whatever still runs."""
    stop.set()
    for t in threads:
        t.join(60)
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)


def post_and_walk_away(url: str, path: str, body: bytes) -> socket.socket:
    """POST a JSON `body` on a raw socket and leave the answer unread; closing the returned socket is a client
    walking away (the server sees the disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def worst_per_sequence(packed, refs, seqs) -> float:
    """Largest absolute difference between packed hidden states [T, H] (sequences end to end) and each sequence's
    reference states [L, H] (a list, one a sequence), over every sequence."""
    cu = np.cumsum([0, *map(len, seqs)])
    return max((packed[cu[i]:cu[i + 1]] - r).abs().max().item() for i, r in enumerate(refs))


def folder_check_refuses(folder: Path, tmp_path: Path, missing: str, misshaped: tuple[str, object], shape_message: str) -> None:
    """A copy of the model folder without the weight `missing`, then with it back and `misshaped` = (name, tensor)
    put in: each refused by the start-up check, with the missing name and then `shape_message` (a regex)."""
    import shutil  # noqa: PLC0415

    import pytest  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from models.checks import check_model_settings  # noqa: PLC0415
    from models.config import ModelFolderError  # noqa: PLC0415
    from models.folder import read_model_folder  # noqa: PLC0415

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    kept = tensors.pop(missing)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=f"'{missing}' is missing"):
        check_model_settings(read_model_folder(bad), "cpu", "float32")
    save_file({**tensors, missing: kept, misshaped[0]: misshaped[1]}, str(bad / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=shape_message):
        check_model_settings(read_model_folder(bad), "cpu", "float32")


def truncation_served_as_encode(short: Path, texts: list[str], limit: int) -> None:
    """A folder whose max_seq_length is `limit`: texts past it are a 413 without truncate, and with it the vectors of
    SentenceTransformer.encode (which cuts at the limit, special tokens kept)."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    with ServerThread(create_app(settings(model={"path": str(short), "name": "short"}))) as s, s.client() as c:
        refused = c.post("/embed", json={"inputs": texts})
        cut = c.post("/embed", json={"inputs": texts, "truncate": True})
    assert refused.status_code == 413 and f"more than the limit of {limit}" in refused.json()["error"], refused.text
    np.testing.assert_allclose(np.array(cut.json()), SentenceTransformer(str(short), device="cpu").encode(texts), atol=2e-5)


def causal_lm_copy(folder: Path, dest: Path) -> Path:
    """A copy of a decoder folder as a *ForCausalLM checkpoint names it: a `model.` prefix before every weight, and an
    lm_head (tied to the token embeddings' values) that the server must not read."""
    import shutil  # noqa: PLC0415

    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    shutil.copytree(folder, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    tensors = {f"model.{k}": v for k, v in tensors.items()} | {"lm_head.weight": tensors["embed_tokens.weight"].clone()}
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def bfloat16_cosine(run, seqs: list[list[int]], mode: str = "mean") -> float:
    """The smallest cosine, over the sequences, between run(torch.bfloat16)'s and run(torch.float32)'s packed hidden
    states [T, H] pooled by `mode` (mean, cls, last)."""
    import torch  # noqa: PLC0415

    from models.encoder import PackedBatch, pool  # noqa: PLC0415

    batch = PackedBatch.from_ids(seqs, 0)
    got, want = (pool(run(dtype), batch, mode) for dtype in (torch.bfloat16, torch.float32))
    return torch.nn.functional.cosine_similarity(got, want, dim=1).min().item()
