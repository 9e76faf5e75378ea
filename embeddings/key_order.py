"""Which value of a key is newest on this replica, in stream order, so that an older entry never overwrites it.

Stream entries apply in stream order, but two things can bring an older one after a newer value: this replica's own
HTTP updates, written here at once and replayed by its consumer when their entries come by (an older entry replayed
meanwhile would write the key back), and pending entries claimed from a stopped consumer (older than entries already
applied). `KeyOrder` remembers, per (table, key), the stream order of the value held: a key written over HTTP is
*held* until its own entry is published, then as new as that entry; a key an entry wrote is as new as that entry, for
`window_s`. A held key's order is not known yet (its entry may come before or after one read meanwhile), so the
consumer waits for the publishing (`held`) rather than guess. Memory: the keys written in the window (at most
`max_keys`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

logger = logging.getLogger(__name__)

HOLD_TIMEOUT_S = 30.0  # a hold lasts one local write and one XADD; past this it is taken as lost (and logged)


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (`<ms>-<seq>`) as a comparable pair: stream order."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class KeyOrder:
    """Per (table, key), the stream order of the value this replica holds, as long as it matters. Thread-safe."""

    def __init__(self, window_s: float, max_keys: int = 2_000_000, hold_timeout_s: float = HOLD_TIMEOUT_S) -> None:
        self.window_s, self.max_keys, self.hold_timeout_s = window_s, max_keys, hold_timeout_s
        self._newest: dict[tuple[str, int], tuple[int, int]] = {}
        self._written: deque[tuple[float, str, list[int], tuple[int, int]]] = deque()  # (when, table, keys, order)
        self._held: dict[tuple[str, int], tuple[int, float]] = {}  # (holders, since): HTTP writes being published
        self._lock = threading.Lock()

    def hold(self, table: str, keys: list[int]) -> None:
        """Before writing keys here whose entry will be published: no entry writes them until it is."""
        now = time.monotonic()
        with self._lock:
            for k in keys:  # since: the first holder's, so that a hot key written without pause still times out
                holders, since = self._held.get((table, k), (0, now))
                self._held[(table, k)] = holders + 1, since

    def release(self, table: str, keys: list[int]) -> None:
        """The held write, or its publishing, failed: entries may write the keys again."""
        with self._lock:
            self._unhold(table, keys)

    def _unhold(self, table: str, keys: list[int]) -> None:
        for k in keys:
            holders, since = self._held.get((table, k), (0, 0.0))
            if holders > 1:
                self._held[(table, k)] = holders - 1, since
            else:
                self._held.pop((table, k), None)

    def note(self, table: str, keys: list[int], order: tuple[int, int], published: bool = False) -> None:
        """Keys now hold the value of the entry of `order` (published: the held keys' own entry)."""
        now = time.monotonic()
        with self._lock:
            if published:
                self._unhold(table, keys)
            for k in keys:
                old = self._newest.get((table, k))
                if old is None or old < order:
                    self._newest[(table, k)] = order
            self._written.append((now, table, keys, order))
            while self._written and (self._written[0][0] < now - self.window_s or len(self._newest) > self.max_keys):
                _, t, old_keys, old_order = self._written.popleft()
                for k in old_keys:
                    if self._newest.get((t, k)) == old_order:
                        del self._newest[(t, k)]

    def held(self, table: str, keys: np.ndarray) -> bool:
        """Is any of keys held (written here, its entry not published yet)? A hold older than hold_timeout_s is
        dropped: its publisher is gone, and waiting on it would stop the stream for good."""
        dropped = []
        try:
            with self._lock:
                if not self._held:
                    return False
                stale = time.monotonic() - self.hold_timeout_s
                for k in keys.tolist():
                    holders, since = self._held.get((table, k), (0, 0.0))
                    if holders and since < stale:
                        dropped.append(k)
                        del self._held[(table, k)]
                    elif holders:
                        return True
                return False
        finally:
            if dropped:
                logger.warning("%d key(s) of table %r (first %d) held over %.0f s without their entry being published: "
                               "letting stream entries write them", len(dropped), table, dropped[0], self.hold_timeout_s)

    def superseded(self, table: str, keys: np.ndarray, order: tuple[int, int]) -> np.ndarray:
        """[n] bool: keys whose value here is newer than the entry of `order`."""
        with self._lock:
            if not self._newest:
                return np.zeros(keys.size, dtype=bool)
            return np.fromiter((self._newest.get((table, k), order) > order for k in keys.tolist()), bool, keys.size)

    def reset(self) -> None:
        """Forget every entry's order (the stream's ids started over: a new entry may have a lower id than one
        applied before). Held keys stay held: their HTTP writes are still being published."""
        with self._lock:
            self._newest.clear()
            self._written.clear()
