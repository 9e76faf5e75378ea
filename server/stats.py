"""Triton's statistics extension: per-model counts and cumulative durations, as `GET /v2/models/{name}/stats`
and gRPC ModelStatistics answer them (tritonclient's get_inference_statistics; perf_analyzer's server-side view)."""

from __future__ import annotations

import threading
import time

from server.middleware import Timing


def _duration(count: int, seconds: float) -> dict:
    return {"count": count, "ns": int(seconds * 1e9)}


class InferStats:
    """One model's requests: succeeded or failed (count, total time), and of the succeeded ones the time
    tokenizing (compute_input), queued, and in the model (compute_infer); sequences inferred and batches run."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ok = self.failed = self.inferences = self.executions = 0
        self.ok_s = self.failed_s = self.input_s = self.queue_s = self.infer_s = 0.0
        self.last_ms = 0

    def record(self, timing: Timing, sequences: int, ok: bool, executions: int = 0) -> None:
        elapsed = time.perf_counter() - timing.started
        with self._lock:
            if not ok:
                self.failed += 1
                self.failed_s += elapsed
                return
            self.ok += 1
            self.ok_s += elapsed
            self.input_s += timing.tokenization
            self.queue_s += timing.queue
            self.infer_s += timing.inference
            self.inferences += sequences
            self.executions += executions
            self.last_ms = int(time.time() * 1000)

    def as_dict(self, name: str, executions: int | None = None) -> dict:
        """The model's entry of a statistics response; `executions` overrides the count of batches (the
        encoder's worker counts them, as its batches mix requests)."""
        with self._lock:
            return {"name": name, "version": "1", "last_inference": self.last_ms, "inference_count": self.inferences,
                    "execution_count": self.executions if executions is None else executions,
                    "inference_stats": {"success": _duration(self.ok, self.ok_s), "fail": _duration(self.failed, self.failed_s),
                                        "queue": _duration(self.ok, self.queue_s),
                                        "compute_input": _duration(self.ok, self.input_s),
                                        "compute_infer": _duration(self.ok, self.infer_s),
                                        "compute_output": _duration(self.ok, 0.0)},
                    "batch_stats": []}
