"""Redis tier against real redis-server processes: semantics, layout, capacity, cluster, outages."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
import torch

from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.tier import TableSpec
from embeddings.volatile import partition_of

pytestmark = pytest.mark.redis
DIM = 3
DEFAULT = torch.full((DIM,), -1.0)


def rows(keys, scale=1.0):
    return torch.as_tensor(keys, dtype=torch.float32)[:, None] * scale + torch.arange(DIM, dtype=torch.float32) / 10


def make(urls, cluster=False, **kwargs):
    kwargs = {"partitions": 4, "backoff_s": 0.05, "max_backoff_s": 0.2, "timeout_s": 0.2, **kwargs}
    tier = RedisTier(urls, cluster=cluster, **kwargs)
    tier.create_table(TableSpec("t", DIM, DEFAULT))
    return tier


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def check_semantics(tier):
    tier.insert("t", torch.tensor([1, 2, 3, 2]), torch.cat([rows([1, 2, 3]), rows([2], 5)]))
    vectors, found = tier.lookup("t", torch.tensor([2, 4, 1, 2]))
    assert found.tolist() == [True, False, True, True]
    assert torch.equal(vectors, torch.stack([rows([2], 5)[0], DEFAULT, rows([1])[0], rows([2], 5)[0]]))
    assert tier.update("t", torch.tensor([1, 9]), rows([1, 9], 2)) == 1  # 9 is not held: not added
    vectors, found = tier.lookup("t", torch.tensor([1, 9]))
    assert found.tolist() == [True, False] and torch.equal(vectors[0], rows([1], 2)[0])
    assert tier.evict("t", torch.tensor([1, 1, 8])) == 1
    assert tier.lookup("t", torch.tensor([1, 3]))[1].tolist() == [False, True]
    assert tier.counters()["errors"] == 0


def test_single_node_semantics_and_layout(redis_node):
    tier = make(redis_node.url)
    check_semantics(tier)
    client = redis.Redis(port=redis_node.port)
    p = int(partition_of(np.array([3]), 4)[0])
    raw = client.hget(f"turboserve:emb:{{t:{p}}}", np.array([3], "<i8").tobytes())
    assert np.frombuffer(raw, np.float32).tolist() == rows([3])[0].tolist()
    tier.close()


@pytest.mark.parametrize("policy", ["evict_random", "evict_oldest"])
def test_capacity_per_partition(redis_node, policy):
    tier = make(redis_node.url, partitions=2, capacity_per_partition=20, overflow_policy=policy, target_fill=0.5)
    for start in range(0, 200, 25):
        keys = torch.arange(start, start + 25)
        tier.insert("t", keys, rows(keys.tolist()))
        assert max(tier.fill("t")) <= 20
    held = torch.arange(200)[tier.lookup("t", torch.arange(200))[1]]
    assert tier.counters()["evictions"] > 0 and 0 < held.numel() <= 40
    if policy == "evict_oldest":
        assert held.min() >= 150  # only rows of the last two batches can remain
    tier.close()


def test_cluster_semantics_and_one_node_per_partition(redis_cluster):
    tier = make([n.url for n in redis_cluster], cluster=True, partitions=16)
    check_semantics(tier)
    tier.insert("t", torch.arange(1000), rows(range(1000)))
    vectors, found = tier.lookup("t", torch.arange(1000))
    assert found.all() and torch.equal(vectors, rows(range(1000)))
    client = redis.Redis(port=redis_cluster[0].port)
    slots = [client.cluster("keyslot", f"turboserve:emb:{{t:{p}}}") for p in range(16)]
    assert all(client.cluster("keyslot", f"turboserve:emb:{{t:{p}}}:t") == s for p, s in enumerate(slots))
    holders = set()
    for node in redis_cluster:
        node_client = redis.Redis(port=node.port)
        if any(node_client.cluster("countkeysinslot", s) for s in slots):
            holders.add(node.port)
        node_client.close()
    assert len(holders) >= 2  # partitions spread over the nodes
    tier.close()


def test_redis_down_falls_back_to_persistent_and_recovers(redis_node, tmp_path):
    volatile = make(redis_node.url)
    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False), volatile, DeviceCache(8, 2, device="cpu"))
    server.create_table("t", DIM, DEFAULT)
    server.update("t", torch.arange(100), rows(range(100)))
    keys = torch.arange(0, 100, 3)  # 34 keys: more than the device cache holds
    for _ in range(2):
        vectors, found = server.lookup("t", keys)
        assert found.all() and torch.equal(vectors, rows(keys.tolist()))
    assert volatile.counters()["hits"] > 0

    redis_node.stop()
    expected = rows(keys.tolist())
    for step in range(5):
        vectors, found = server.lookup("t", keys)  # no exception: Redis answers misses, RocksDB the rows
        assert found.all() and torch.equal(vectors, expected), step
        server.update("t", torch.tensor([3]), rows([3], 10 + step))
        expected[1] = rows([3], 10 + step)[0]
    assert volatile.counters()["errors"] >= 1 and not volatile.available
    vectors, _ = server.lookup("t", torch.tensor([3]))
    assert torch.equal(vectors[0], rows([3], 14)[0])

    redis_node.start()  # same port, empty
    hits_before = volatile.counters()["hits"]

    def recovered():
        vectors, found = server.lookup("t", keys)
        assert found.all() and torch.equal(vectors, expected)
        return volatile.counters()["hits"] > hits_before

    wait_until(recovered)
    assert volatile.available
    server.close()


def test_writes_missed_during_an_outage_are_invalidated_on_recovery(redis_node):
    tier = make(redis_node.url, timeout_s=0.1)
    tier.insert("t", torch.tensor([1, 2]), rows([1, 2]))
    admin = redis.Redis(port=redis_node.port)
    admin.client_pause(600, all=True)  # Redis keeps its data but stops answering for 0.6 s
    assert tier.update("t", torch.tensor([1]), rows([1], 7)) == 0  # times out: Redis may still hold the old row
    assert tier.counters()["errors"] == 1
    redis.Redis(port=redis_node.port, socket_timeout=5).ping()  # answered once the pause ends
    wait_until(lambda: tier.available)
    _, found = tier.lookup("t", torch.tensor([1, 2]))
    assert found.tolist() == [False, True]  # the stale row 1 was deleted, row 2 kept
    tier.close()


def snapshot_then_update(redis_node, db, sync: bool) -> tuple[ParameterServer, RedisTier]:
    """A server (no device cache: every lookup asks Redis) whose Redis snapshots rows 7 and 8, then takes an update
    of row 7 (RocksDB, then the row Redis holds): restarted from that snapshot, Redis holds the old row 7."""
    persistent = PersistentTier(db, sync=sync)
    volatile = make(redis_node.url, journal=persistent)
    server = ParameterServer(persistent, volatile, None)
    server.create_table("t", DIM, DEFAULT)
    server.persistent.update("t", torch.tensor([7, 8]), rows([7, 8]))
    assert server.lookup("t", torch.tensor([7, 8]))[1].all()  # filled into Redis
    admin = redis.Redis(port=redis_node.port)
    admin.save()
    admin.close()
    server.update("t", torch.tensor([7]), rows([7], 9))
    return server, volatile


def serves_the_update(server: ParameterServer, volatile: RedisTier) -> None:
    for _ in range(3):
        vectors, found = server.lookup("t", torch.tensor([7, 8]))
        assert found.all() and torch.equal(vectors[0], rows([7], 9)[0]), vectors
    assert volatile.lookup("t", torch.tensor([7]))[1].tolist() == [True]  # filled again, with the new row
    assert torch.equal(volatile.lookup("t", torch.tensor([7]))[0][0], rows([7], 9)[0])
    assert server.persistent.journal() == {}  # the whole-table drop was journalled until it was done


def test_a_redis_restarted_from_an_older_snapshot_serves_no_row_older_than_an_update(redis_node, tmp_path):
    """Redis snapshots a row, then takes an update of it, then restarts from the snapshot (a crash with RDB or AOF
    everysec, a failover): no call of ours failed, yet Redis holds the old row. The new run_id gives it away."""
    server, volatile = snapshot_then_update(redis_node, tmp_path / "db", sync=False)
    redis_node.stop()  # (no save at shutdown: `--save ""`)
    redis_node.start()  # loads the snapshot: row 7 as it was before the update
    serves_the_update(server, volatile)
    server.close()


def test_a_redis_restarted_from_an_older_snapshot_while_no_server_ran_is_noticed_at_the_next_start(redis_node, tmp_path):
    """As above, but the server stops before Redis restarts and a new one starts after: the run_id the first saw
    is kept in RocksDB beside the rows, so the second still knows Redis restarted."""
    db = tmp_path / "db"
    server, _ = snapshot_then_update(redis_node, db, sync=True)
    server.close()
    redis_node.stop()
    redis_node.start()  # the snapshot: row 7 as it was before the update

    def restart() -> tuple[ParameterServer, RedisTier]:
        persistent = PersistentTier(db, sync=True)
        volatile = make(redis_node.url, journal=persistent)
        return ParameterServer(persistent, volatile, None), volatile

    server, volatile = restart()
    serves_the_update(server, volatile)
    server.close()
    server, volatile = restart()  # a Redis that did not restart keeps its rows for the next server: nothing dropped
    assert volatile.lookup("t", torch.tensor([7, 8]))[1].all()
    server.close()


def test_a_redis_user_without_info_still_has_a_working_tier(redis_node):
    """The run_id check's INFO may be refused (an ACL user without +info, a renamed command, a proxy): the tier works
    as before, without noticing restarts, rather than failing every connection."""
    admin = redis.Redis(port=redis_node.port)
    admin.acl_setuser("noinfo", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"])
    admin.close()
    tier = make(f"redis://noinfo:pw@127.0.0.1:{redis_node.port}")
    check_semantics(tier)
    tier.close()


def test_unreachable_redis_never_raises(tmp_path):
    tier = make("redis://127.0.0.1:1")
    vectors, found = tier.lookup("t", torch.tensor([1, 2]))
    assert not found.any() and torch.equal(vectors, DEFAULT.expand(2, -1))
    tier.insert("t", torch.tensor([1]), rows([1]))
    assert tier.update("t", torch.tensor([1]), rows([1])) == 0 and tier.evict("t", torch.tensor([1])) == 0
    assert tier.fill("t") is None
    counts = tier.counters()
    assert counts["errors"] + counts["skipped"] == 5 and counts["errors"] >= 1


def test_unreachable_cluster_never_raises():
    tier = make(["redis://127.0.0.1:1", "redis://127.0.0.1:2"], cluster=True)
    assert not tier.lookup("t", torch.tensor([1]))[1].any()
    tier.insert("t", torch.tensor([1]), rows([1]))
    assert tier.counters()["errors"] >= 1


def test_a_cluster_node_down_and_back(redis_cluster, tmp_path):
    """Last in the module: it restarts a node of the shared cluster."""
    volatile = make([n.url for n in redis_cluster], cluster=True, partitions=16)
    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False), volatile, DeviceCache(8, 2, device="cpu"))
    server.create_table("t", DIM, DEFAULT)
    keys = torch.arange(500, 600)
    server.update("t", keys, rows(keys.tolist()))
    server.lookup("t", keys)
    redis_cluster[2].stop()
    for _ in range(3):
        vectors, found = server.lookup("t", keys)
        assert found.all() and torch.equal(vectors, rows(keys.tolist()))
    assert volatile.counters()["errors"] >= 1
    redis_cluster[2].start()  # rejoins with its nodes.conf
    hits_before = volatile.counters()["hits"]

    def recovered():
        vectors, found = server.lookup("t", keys)
        assert found.all() and torch.equal(vectors, rows(keys.tolist()))
        return volatile.counters()["hits"] > hits_before + 50

    wait_until(recovered, timeout=30)
    server.close()


def test_a_stale_row_is_deleted_even_after_a_restart_during_the_outage(redis_node, tmp_path):
    """An update that Redis missed (paused) is journalled in RocksDB before it returns: a server that stops before
    Redis answers again, and a new one started after, still deletes the stale row (it was served for good)."""
    db = tmp_path / "db"
    persistent = PersistentTier(db, sync=True)
    server = ParameterServer(persistent, make(redis_node.url, timeout_s=0.1, journal=persistent), None)
    server.create_table("t", DIM, DEFAULT)
    server.update("t", torch.tensor([1, 2]), rows([1, 2]))
    server.volatile.insert("t", torch.tensor([1, 2]), rows([1, 2]))  # Redis holds both
    redis.Redis(port=redis_node.port).client_pause(700, all=True)
    server.update("t", torch.tensor([1]), rows([1], 7))  # RocksDB has it; Redis does not (timed out)
    assert persistent.journal()["t"].tolist() == [1]
    server.close()  # stops before Redis came back
    redis.Redis(port=redis_node.port, socket_timeout=5).ping()
    persistent = PersistentTier(db, sync=True)
    volatile = make(redis_node.url, journal=persistent)
    server = ParameterServer(persistent, volatile, None)
    vectors, found = server.lookup("t", torch.tensor([1, 2]))
    assert found.all() and torch.equal(vectors[0], rows([1], 7)[0]), vectors  # not Redis's stale row
    assert persistent.journal() == {}  # forgotten once Redis deleted the row
    server.close()


def test_a_reimported_table_reads_none_of_the_rows_redis_kept(redis_node, tmp_path):
    """import-embeddings gives the table a new epoch, part of the Redis key names: rows Redis cached before are not
    read (the re-import's rows were hidden behind them); the same rows imported again give the same epoch."""
    import numpy as np  # noqa: PLC0415

    from server.import_tables import import_table  # noqa: PLC0415

    db, first, second = tmp_path / "db", tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, np.arange(30, dtype=np.float32).reshape(10, 3))
    np.save(second, -np.arange(30, dtype=np.float32).reshape(10, 3))
    import_table(str(db), "t", str(first), progress=False)

    def serve():
        persistent = PersistentTier(db, sync=False)
        volatile = RedisTier(redis_node.url, partitions=4, timeout_s=0.5, journal=persistent)
        return ParameterServer(persistent, volatile, DeviceCache(4, 2, device="cpu"))

    server = serve()
    epoch = server.tables["t"].epoch
    assert epoch and server.lookup("t", torch.arange(10))[1].all()
    assert server.volatile.lookup("t", torch.arange(10))[1].all()  # cached in Redis
    server.close()
    import_table(str(db), "t", str(second), progress=False)
    server = serve()
    vectors, found = server.lookup("t", torch.arange(10))
    assert found.all() and torch.equal(vectors, -torch.arange(30, dtype=torch.float32).reshape(10, 3))
    assert server.tables["t"].epoch != epoch
    server.close()
    other = tmp_path / "copy"  # another replica's copy, imported the same way: the same epochs, so Redis is shared
    import_table(str(other), "t", str(first), progress=False)
    import_table(str(other), "t", str(second), progress=False)
    copy = PersistentTier(other, sync=False)
    same = copy.tables["t"].epoch
    copy.close()
    check = PersistentTier(db, sync=False)
    assert check.tables["t"].epoch == same
    check.close()
