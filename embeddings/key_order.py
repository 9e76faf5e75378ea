"""Which value of a key is newest on this replica, in stream order, so that an older entry never overwrites it.

Stream entries apply in stream order, but two things can bring an older one after a newer value: this replica's own
HTTP updates, written here at once and replayed by its consumer when their entries come by (an older entry replayed
meanwhile would write the key back), and pending entries claimed from a stopped consumer (older than entries already
applied). `KeyOrder` remembers, per (table, key), the stream order of the value held: a key written over HTTP is
*held* (newer than any entry) until its own entry is published, then as new as that entry; a key an entry wrote is as
new as that entry, for `window_s`. Memory: the keys written in the window (at most `max_keys`).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

HELD = (1 << 62, 0)  # the order of a key written here whose entry is being published (newer than any entry)


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (`<ms>-<seq>`) as a comparable pair: stream order."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class KeyOrder:
    """Per (table, key), the stream order of the value this replica holds, as long as it matters. Thread-safe."""

    def __init__(self, window_s: float, max_keys: int = 2_000_000) -> None:
        self.window_s, self.max_keys = window_s, max_keys
        self._newest: dict[tuple[str, int], tuple[int, int]] = {}
        self._written: deque[tuple[float, str, list[int], tuple[int, int]]] = deque()  # (when, table, keys, order)
        self._lock = threading.Lock()

    def hold(self, table: str, keys: list[int]) -> None:
        """Before writing keys here whose entry will be published: no entry writes them until it is."""
        with self._lock:
            for k in keys:
                self._newest[(table, k)] = HELD

    def release(self, table: str, keys: list[int]) -> None:
        """The held write, or its publishing, failed: entries may write the keys again."""
        with self._lock:
            for k in keys:
                if self._newest.get((table, k)) == HELD:
                    del self._newest[(table, k)]

    def note(self, table: str, keys: list[int], order: tuple[int, int], published: bool = False) -> None:
        """Keys now hold the value of the entry of `order` (published: the held keys' own entry)."""
        now = time.monotonic()
        with self._lock:
            for k in keys:
                old = self._newest.get((table, k))
                if old is None or old < order or (published and old == HELD):
                    self._newest[(table, k)] = order
            self._written.append((now, table, keys, order))
            while self._written and (self._written[0][0] < now - self.window_s or len(self._newest) > self.max_keys):
                _, t, old_keys, old_order = self._written.popleft()
                for k in old_keys:
                    if self._newest.get((t, k)) == old_order:
                        del self._newest[(t, k)]

    def superseded(self, table: str, keys: np.ndarray, order: tuple[int, int]) -> np.ndarray:
        """[n] bool: keys whose value here is newer than the entry of `order`."""
        with self._lock:
            if not self._newest:
                return np.zeros(keys.size, dtype=bool)
            return np.fromiter((self._newest.get((table, k), order) > order for k in keys.tolist()), bool, keys.size)
