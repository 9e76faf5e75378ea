"""The load generator's baseline: sentence-transformers encoding the same texts in this process (the peer the
server's throughput is compared with; bench/loadgen.py --baseline)."""

from __future__ import annotations

import os
import time

import numpy as np

from bench.harness import CpuMeter


class Baseline:
    """SentenceTransformer(model folder, default the embedded model, device="cpu") in this process, loaded once;
    on another device (cuda) and dtype (float16, bfloat16) when asked."""

    def __init__(self, batch_size: int, model: str | None = None, device: str = "cpu", dtype: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from tests.hf_import import import_transformers

        import_transformers()  # before sentence_transformers: see tests/hf_import.py
        from sentence_transformers import SentenceTransformer

        from models.config import default_model_path

        self.batch_size = batch_size
        self.threads = torch.get_num_threads()
        self.model = SentenceTransformer(str(model or default_model_path()), device=device)
        if dtype:
            self.model.to(getattr(torch, dtype))
        self._warm = False

    def run(self, texts: list[str], runs: int = 1) -> dict:
        """encode(texts, batch_size) timed `runs` times (after one warm-up call); texts_per_s is the median run's."""
        if not self._warm:
            self.model.encode(texts[: self.batch_size * 2], batch_size=self.batch_size)
            self._warm = True
        meter = CpuMeter()
        start = meter.snapshot()
        times = []
        for _ in range(max(1, runs)):
            started = time.perf_counter()
            self.model.encode(texts, batch_size=self.batch_size)
            times.append(time.perf_counter() - started)
        elapsed = float(np.median(times))
        return {"texts": len(texts), "batch_size": self.batch_size, "runs": len(times), "elapsed_s": round(elapsed, 3),
                "texts_per_s": round(len(texts) / elapsed, 3),
                "texts_per_s_each": [round(len(texts) / t, 3) for t in times], "torch_threads": self.threads,
                "max_seq_length": self.model.max_seq_length, "cpu": meter.since(start)}
