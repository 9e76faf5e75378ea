"""The update stream's message format: one stream entry is one update of one table, with three fields:

    table    the table's name, UTF-8
    keys     n int64 keys, little-endian (8n bytes)
    vectors  n rows of the table's dim float32s, little-endian, row-major (4·n·dim bytes)

`encode_update` builds the fields and `publish_update` XADDs them (a trainer needs only numpy and redis-py:
`r.xadd(stream, {"table": t, "keys": k.astype("<i8").tobytes(), "vectors": v.astype("<f4").tobytes()})`);
`decode_update` reads them back, refusing what can never apply. The consumer is embeddings/stream.py.
"""

from __future__ import annotations

import socket

import numpy as np
import redis


class RejectedUpdate(ValueError):
    """A stream entry that can never be applied (malformed, unknown table, wrong sizes)."""


def encode_update(table: str, keys: np.ndarray | list[int], vectors: np.ndarray) -> dict[str, bytes]:
    """The stream fields of one update: keys [n] int64, vectors [n, dim] float32."""
    k = np.asarray(keys, dtype=np.int64).reshape(-1)
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != k.size:
        raise ValueError(f"vectors must be [{k.size}, dim], got {v.shape}")
    return {"table": table.encode(), "keys": k.astype("<i8").tobytes(), "vectors": v.astype("<f4").tobytes()}


def publish_update(client: redis.Redis, stream: str, table: str, keys: np.ndarray | list[int], vectors: np.ndarray) -> bytes:
    """XADD one update to the stream; returns the entry id."""
    return client.xadd(stream, encode_update(table, keys, vectors))  # type: ignore[arg-type]


def decode_update(fields: dict[bytes, bytes], dims: dict[str, int]) -> tuple[str, np.ndarray, np.ndarray]:
    """(table, keys [n] int64, vectors [n, dim] float32) of one entry; RejectedUpdate says what is wrong."""
    missing = [f for f in (b"table", b"keys", b"vectors") if f not in fields]
    if missing:
        raise RejectedUpdate(f"missing field(s) {b', '.join(missing).decode()}")
    try:
        table = fields[b"table"].decode()
    except UnicodeDecodeError:
        raise RejectedUpdate("table is not UTF-8") from None
    if table not in dims:
        raise RejectedUpdate(f"no table {table!r} (known: {sorted(dims)})")
    raw_keys, raw_vectors, dim = fields[b"keys"], fields[b"vectors"], dims[table]
    if len(raw_keys) % 8:
        raise RejectedUpdate(f"keys hold {len(raw_keys)} bytes, not a multiple of 8 (int64)")
    n = len(raw_keys) // 8
    if len(raw_vectors) != 4 * n * dim:
        raise RejectedUpdate(f"vectors hold {len(raw_vectors)} bytes; {n} keys of table {table!r} (dim {dim}) need {4 * n * dim}")
    vectors = np.frombuffer(raw_vectors, dtype="<f4").reshape(n, dim)
    if not np.isfinite(vectors).all():
        raise RejectedUpdate("vectors hold NaN or infinity")
    return table, np.frombuffer(raw_keys, dtype="<i8").astype(np.int64), vectors.astype(np.float32)


def group_name(template: str, consumer: str) -> str:
    """The consumer group named by a template: `{consumer}` and `{hostname}` filled in, e.g.
    `group_name("turboserve-{consumer}", "pod-a") == "turboserve-pod-a"`; ValueError for another placeholder."""
    try:
        name = template.format(consumer=consumer, hostname=socket.gethostname())
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"update group {template!r}: only {{consumer}} and {{hostname}} may be filled in ({exc!r})") from None
    if not name:
        raise ValueError(f"update group {template!r} names an empty group")
    return name
