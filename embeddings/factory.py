"""Build a ParameterServer from the `embeddings` section of the settings."""

from __future__ import annotations

import os

import torch

from configs.settings import EmbeddingSettings
from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.tier import Tier
from embeddings.volatile import VolatileTier


def build_volatile(settings: EmbeddingSettings, journal: PersistentTier | None = None) -> Tier:
    """The volatile tier the settings name: in-memory partitions, one Redis node, or a Redis Cluster (journal: where
    Redis's stale keys are recorded to survive a restart, the persistent tier)."""
    if settings.volatile_backend == "memory":
        return VolatileTier(settings.partitions, settings.partition_capacity, settings.overflow_policy, settings.target_fill)
    return RedisTier(settings.redis_urls, cluster=settings.volatile_backend == "redis_cluster",
                     partitions=settings.partitions, capacity_per_partition=settings.partition_capacity,
                     overflow_policy=settings.overflow_policy,  # type: ignore[arg-type]  # validated by the settings
                     target_fill=settings.target_fill, timeout_s=settings.redis_timeout_s, journal=journal)


def build_parameter_server(settings: EmbeddingSettings, device: torch.device | str | None = None) -> ParameterServer:
    """Open the RocksDB directory, build the volatile tier and device cache, and wire them up.

    device: the cache's device; default `settings.cache_device`, else CUDA when present, else CPU.
    """
    capacity: int | float = settings.cache_rows if settings.cache_rows is not None else settings.cache_fraction
    cache = DeviceCache(capacity, settings.cache_ways, settings.cache_policy, device or settings.cache_device)
    persistent = PersistentTier(os.path.expanduser(settings.path), sync=settings.sync_writes)
    return ParameterServer(persistent, build_volatile(settings, persistent), cache, async_defaults=settings.async_defaults,
                           hit_rate_threshold=settings.hit_rate_threshold)
