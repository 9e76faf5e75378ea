"""The recommendation side of the server: the embedding parameter server, the DLRM over it (when one is
configured) and the update stream consumer, built at start-up by the background loader.

Request shapes are checked here, once, for every API family: the routes turn JSON or KServe tensors into
numpy arrays and call `lookup`, `update` or `score`; problems raise the domain errors of server/errors.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch

from configs.settings import Settings
from embeddings.device_cache import DeviceCache
from embeddings.factory import build_parameter_server
from embeddings.hierarchy import ParameterServer, ServerLookup
from embeddings.persistent import PersistentTier
from embeddings.stream import UpdateConsumer
from embeddings.tier import TableSpec
from models.dlrm import DLRM, load_dlrm, read_dlrm_folder
from models.runtime import served_name
from server.errors import InvalidRequest, ModelNotFound, NotEnabled, TableNotFound, TooLarge
from server.stats import InferStats

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class Bag:
    """One sparse feature of a batch as torch.nn.EmbeddingBag takes it: keys [n] int64, offsets [B] (bag starts)."""

    keys: np.ndarray
    offsets: np.ndarray


def bags_from_rows(feature: str, rows: list) -> Bag:
    """JSON rows of one feature, one per sample: a key (a bag of one) or a list of keys (possibly empty)."""
    if all(type(r) is int for r in rows):  # one key a sample (Criteo's features): converted at once
        try:
            return Bag(np.array(rows, dtype=np.int64), np.arange(len(rows), dtype=np.int64))
        except OverflowError:  # a key past int64: as_keys names it
            pass
    lengths = np.fromiter((1 if isinstance(r, int) else len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = [k for r in rows for k in ((r,) if isinstance(r, int) else r)]
    return Bag(as_keys(flat, f"sparse feature {feature!r}"), np.cumsum(lengths) - lengths)


def bags_from_matrix(feature: str, matrix: np.ndarray) -> Bag:
    """A KServe tensor of one feature: [B] (one key a sample) or [B, k] (k keys a sample; -1 pads a shorter bag)."""
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2:
        raise InvalidRequest(f"sparse input {feature!r} must have shape [batch] or [batch, k], got {list(matrix.shape)}")
    keep = matrix != -1  # [B, k]
    lengths = keep.sum(1).astype(np.int64)  # [B]
    return Bag(as_keys(matrix[keep], f"sparse input {feature!r}"), np.cumsum(lengths) - lengths)


def as_keys(keys: list | np.ndarray, what: str) -> np.ndarray:
    """Keys as int64 [n]; InvalidRequest for non-integers or values outside int64."""
    if isinstance(keys, np.ndarray):
        if keys.dtype.kind not in "iu":
            raise InvalidRequest(f"{what}: keys must be integers, got {keys.dtype}")
        if keys.dtype.kind == "u" and keys.size and int(keys.max()) > INT64_MAX:
            raise InvalidRequest(f"{what}: key {int(keys.max())} is out of the int64 range")
        return keys.astype(np.int64).reshape(-1)
    for k in keys:
        if not isinstance(k, int) or isinstance(k, bool):
            raise InvalidRequest(f"{what}: keys must be integers, got {k!r}")
        if not INT64_MIN <= k <= INT64_MAX:
            raise InvalidRequest(f"{what}: key {k} is out of the int64 range")
    return np.asarray(keys, dtype=np.int64).reshape(-1)


class Recommender:
    """The parameter server (always), a DLRM over it (optional) and the update consumer (optional).

    ps: the ParameterServer. model: the DLRM or None. name: the DLRM's served name. max_keys: most keys in one
    request. max_batch: most samples in one recommendation.
    """

    def __init__(self, ps: ParameterServer, model: DLRM | None, name: str | None, max_keys: int, max_batch: int,
                 consumer: UpdateConsumer | None = None) -> None:
        self.ps, self.model, self.name = ps, model, name
        self.max_keys, self.max_batch, self.consumer = max_keys, max_batch, consumer
        self.stats = InferStats()  # the DLRM's KServe requests (Triton's statistics extension)

    # -- the parameter server -----------------------------------------------------------------------
    def dim(self, table: str) -> int:
        spec = self.ps.tables.get(table)
        if spec is None:
            raise TableNotFound(f"no embedding table {table!r} (tables: {', '.join(sorted(self.ps.tables)) or 'none'})")
        return spec.dim

    def _check_count(self, n: int) -> None:
        if n > self.max_keys:
            raise TooLarge(f"{n} keys in one request, more than embeddings.max_keys={self.max_keys}")

    def lookup(self, table: str, keys: list | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """vectors [n, dim] float32 and found [n] bool (False: the table's default vector)."""
        self.dim(table)
        k = as_keys(keys, "keys")
        self._check_count(k.size)
        vectors, found = self.ps.lookup(table, torch.from_numpy(k))
        return vectors.cpu().numpy(), found.cpu().numpy()

    def update(self, table: str, keys: list | np.ndarray, vectors: list | np.ndarray) -> int:
        """Write rows through every tier, persistent first (fsynced when embeddings.sync_writes); returns the row count."""
        dim = self.dim(table)
        k = as_keys(keys, "keys")
        self._check_count(k.size)
        try:
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
                v = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1) if len(vectors) else np.zeros((0, dim), np.float32)
        except ValueError:  # ragged rows
            raise InvalidRequest(f"table {table!r} has dim {dim}: every vector must have {dim} values") from None
        except OverflowError:  # a JSON integer past any float
            raise InvalidRequest("vectors must be finite float32 values (no NaN, no infinity, |x| < 3.4e38)") from None
        if v.shape != (k.size, dim):
            raise InvalidRequest(f"table {table!r} has dim {dim}: vectors must be [{k.size}, {dim}] for {k.size} keys, "
                                 f"got {list(v.shape)}")
        if not np.isfinite(v).all():
            raise InvalidRequest("vectors must be finite float32 values (no NaN, no infinity, |x| < 3.4e38)")
        self.ps.update(table, torch.from_numpy(k), torch.from_numpy(v))
        return int(k.size)

    # -- the DLRM -----------------------------------------------------------------------------------
    def require_model(self, name: str | None = None) -> DLRM:
        """The DLRM, checking a requested name; NotEnabled without one, ModelNotFound for another name."""
        if self.model is None:
            raise NotEnabled("no recommendation model is configured (recommend.model_path)")
        if name is not None and name != self.name:
            raise ModelNotFound(f"model {name!r} is not served here; the recommendation model is {self.name!r}")
        return self.model

    def score(self, dense: np.ndarray, sparse: dict[str, Bag]) -> np.ndarray:
        """Click probabilities [B] of dense [B, num_dense] and one Bag per sparse feature."""
        model = self.require_model()
        cfg = model.config
        if dense.ndim != 2 or dense.shape[1] != cfg.num_dense:
            raise InvalidRequest(f"dense must be [batch, {cfg.num_dense}], got {list(dense.shape)}")
        batch = dense.shape[0]
        if batch > self.max_batch:
            raise TooLarge(f"{batch} samples in one request, more than recommend.max_batch={self.max_batch}")
        if not np.isfinite(dense).all():
            raise InvalidRequest("dense features must be finite (no NaN or infinity)")
        features = {f.name: f for f in cfg.sparse_features}
        if set(sparse) != set(features):
            missing, extra = sorted(set(features) - set(sparse)), sorted(set(sparse) - set(features))
            raise InvalidRequest(f"sparse features must be exactly {sorted(features)}; missing {missing}, unknown {extra}")
        self._check_count(sum(b.keys.size for b in sparse.values()))
        bags = {}
        for name, bag in sparse.items():
            f = features[name]
            if bag.offsets.size != batch:
                raise InvalidRequest(f"sparse feature {name!r} has {bag.offsets.size} samples; dense has {batch}")
            if bag.keys.size and (int(bag.keys.min()) < 0 or int(bag.keys.max()) >= f.cardinality):
                bad = int(bag.keys.min()) if int(bag.keys.min()) < 0 else int(bag.keys.max())
                raise InvalidRequest(f"key {bad} of sparse feature {name!r} is out of range [0, {f.cardinality}) "
                                     f"of table {f.table!r}")
            bags[name] = (torch.from_numpy(bag.keys), torch.from_numpy(bag.offsets))
        with torch.inference_mode():
            try:
                scores = model(torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)), bags,
                               ServerLookup(self.ps))  # every table in one ParameterServer call
            except ValueError as exc:  # the model's own checks, should one slip past those above
                raise InvalidRequest(str(exc)) from None
        return scores.float().cpu().numpy()

    def metadata(self) -> dict:
        """KServe v2 model metadata of the DLRM."""
        cfg = self.require_model().config
        sparse = [{"name": f.name, "datatype": "INT64", "shape": [-1, -1]} for f in cfg.sparse_features]
        return {"name": self.name, "versions": ["1"], "platform": "turboserve_dlrm",
                "inputs": [{"name": "dense", "datatype": "FP32", "shape": [-1, cfg.num_dense]}, *sparse],
                "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1]}]}

    def close(self) -> None:
        """Stop the update consumer, then close the tiers (releases RocksDB's lock)."""
        if self.consumer is not None:
            self.consumer.stop()
        self.ps.close()


def dlrm_name(settings: Settings) -> str:
    """The DLRM's served name: recommend.name, else its folder's name; ValueError when the encoder or the re-ranker
    has it (two models under one KServe path)."""
    name = settings.recommend.name or Path(settings.recommend.model_path).resolve().name
    if name == served_name(settings.model.path, settings.model.name):
        raise ValueError(f"recommend.name={name!r} is also the encoder's name: give them different names "
                         "(recommend.name or model.name)")
    reranker = settings.reranker
    if reranker is not None and name == served_name(reranker.path, reranker.name):
        raise ValueError(f"recommend.name={name!r} is also the re-ranker's name: give them different names "
                         "(recommend.name or reranker.name)")
    return name


def check_table_dims(stored: dict[str, TableSpec], config, model_path: str) -> None:
    """ValueError for a table the DLRM uses that is stored with another dim."""
    for table in config.tables:
        spec = stored.get(table)
        if spec is not None and spec.dim != config.embedding_dim:
            raise ValueError(f"table {table!r} is stored with dim {spec.dim}; the DLRM at {model_path} needs "
                             f"embedding_dim {config.embedding_dim}")


def check_recommender(settings: Settings) -> None:
    """What the CLI refuses before the port opens (ValueError / ModelFolderError naming the setting): a DLRM folder
    that is not one, a name the encoder already has, an embedding store another process holds or whose tables'
    dims the DLRM does not take, an update stream on a Redis Cluster."""
    emb, rec = settings.embeddings, settings.recommend
    if not emb.enabled:
        return
    check_update_stream(emb)
    config = None
    if rec.model_path:
        config, _ = read_dlrm_folder(rec.model_path)
        dlrm_name(settings)
    path = os.path.expanduser(emb.path)
    try:
        store = PersistentTier(path, sync=False)
    except Exception as exc:  # noqa: BLE001 - rocksdict raises a plain Exception ("IO error: lock ...")
        raise ValueError(f"embeddings.path: cannot open the embedding store at {path}: {exc} (is another server or an "
                         "import using it?)") from None
    try:
        specs = dict(store.tables)
        if config is not None:
            check_table_dims(specs, config, rec.model_path)
            for table, rows in config.tables.items():
                specs.setdefault(table, TableSpec(table, config.embedding_dim, rows=rows))
        _check_cache_fits(emb, list(specs.values()))
    finally:
        store.close()


def check_update_stream(emb) -> None:
    """ValueError for an update stream that would live on a Redis Cluster: the consumer is a client of one node (its
    reads would be MOVED for ever) and rejects an entry with a MULTI across two slots. A Redis that does not answer
    is let through: the consumer waits for it, as for any outage."""
    if not emb.update_stream:
        return
    advice = "point embeddings.update_stream_url at a standalone Redis (cluster_enabled:0)"
    if emb.update_stream_url is None and emb.volatile_backend == "redis_cluster":
        raise ValueError(f"embeddings.update_stream={emb.update_stream!r} would live on the Redis Cluster of the "
                         f"volatile tier (volatile_backend='redis_cluster', no update_stream_url), which the update "
                         f"stream does not support: {advice}")
    url = emb.update_stream_url or emb.redis_urls[0]
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        enabled = int(client.info("cluster").get("cluster_enabled", 0))
    except redis.RedisError:
        return
    finally:
        client.close()
    if enabled:
        raise ValueError(f"embeddings.update_stream={emb.update_stream!r}: the Redis at {url} is a Redis Cluster node "
                         f"(cluster_enabled:1), which the update stream does not support: {advice}")


def shared_without_updates(emb) -> str | None:
    """Why a Redis volatile tier, if other replicas share it, could serve rows from before an update (no update stream,
    or HTTP updates not published to it), else None."""
    if emb.volatile_backend == "memory" or (emb.update_stream and emb.update_publish):
        return None
    missing = "no embeddings.update_stream" if not emb.update_stream else "embeddings.update_publish is false"
    return (f"the volatile tier is a Redis ({emb.volatile_backend}) and {missing}: if other replicas share that Redis, an "
            f"update taken over HTTP here is not applied by them, and their lookups fill Redis (and so this replica's "
            f"device cache) with the row from before it; set update_stream (and update_publish) on every replica")


def _check_cache_fits(emb, specs: list[TableSpec]) -> None:
    """ValueError when the device cache the settings ask for exceeds the memory its device has free (it failed at
    load with the allocator's own message, the server left unready)."""
    capacity = emb.cache_rows if emb.cache_rows is not None else emb.cache_fraction
    cache = DeviceCache(capacity, emb.cache_ways, emb.cache_policy, emb.cache_device, fused=False)  # no tables yet
    need = sum(DeviceCache.bytes_per_table(math.ceil(cache.capacity_rows(s) / cache.ways), cache.ways, s.dim, cache.policy)
               for s in specs if s.rows is not None or emb.cache_rows is not None)
    if cache.device.type == "cuda":
        free = torch.cuda.mem_get_info(cache.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise ValueError(f"the device cache of {len(specs)} tables needs {need / 2**30:.1f} GiB on {cache.device}, where "
                         f"{free / 2**30:.1f} GiB are free: lower embeddings.cache_fraction or set embeddings.cache_rows")


def preload_volatile(ps: ParameterServer, fraction: float) -> None:
    """Fill the volatile tier from RocksDB before the server is ready (embeddings.volatile_preload), with a progress bar."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(desc="preloading the volatile tier", unit="rows", unit_scale=True, disable=not sys.stderr.isatty()) as bar:
        loaded = ps.preload(fraction, progress=bar.update)
    log.info("volatile tier preloaded with %d rows of %d tables in %.1f s", sum(loaded.values()), len(loaded),
             time.perf_counter() - t0)


def build_recommender(settings: Settings) -> Recommender:
    """Open the parameter server and load the DLRM whose tables it must hold; start the update consumer."""
    emb, rec = settings.embeddings, settings.recommend
    model, name = None, None
    if rec.model_path:
        config, _ = read_dlrm_folder(rec.model_path)  # a bad folder fails before RocksDB is opened
        name = dlrm_name(settings)
    unseen = shared_without_updates(emb)
    if unseen:
        log.warning("%s", unseen)
    ps = build_parameter_server(emb)
    try:
        if rec.model_path:
            check_table_dims(ps.tables, config, rec.model_path)
            for table, rows in config.tables.items():
                if table not in ps.tables:
                    log.warning("table %r of the DLRM is not in %s: every key answers the default vector until it "
                                "is imported (turboserve import-embeddings)", table, emb.path)
                    ps.create_table(table, config.embedding_dim, rows=rows)
            model = load_dlrm(rec.model_path, device=ps.device, dtype=rec.dtype)
        if emb.volatile_preload > 0:
            preload_volatile(ps, emb.volatile_preload)
        consumer = None
        if emb.update_stream:
            consumer = UpdateConsumer(ps, emb.update_stream_url or emb.redis_urls[0], emb.update_stream, emb.update_group,
                                      emb.update_consumer, emb.update_batch, emb.update_block_ms, emb.update_claim_idle_ms,
                                      publishes=emb.update_publish, maxlen=emb.update_stream_maxlen,
                                      settle_s=emb.update_settle_s, max_keys=emb.max_keys)
            consumer.start()
    except BaseException:
        ps.close()
        raise
    log.info("embedding parameter server at %s: tables %s%s", emb.path,
             {t: s.dim for t, s in ps.tables.items()}, f"; DLRM {name!r}" if name else "")
    return Recommender(ps, model, name, emb.max_keys, rec.max_batch, consumer)
