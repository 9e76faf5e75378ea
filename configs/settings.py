"""One `Settings` object, built once in `main()` and handed down; never read at import.

Sources, highest priority first: explicit overrides (CLI flags), environment variables
(`TURBOSERVE_<SECTION>__<FIELD>`, e.g. `TURBOSERVE_SCHEDULER__MAX_BATCH_TOKENS=8192`), the YAML
file given with `--config`, then the defaults below.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

# The YAML file's contents while load_settings builds a Settings; read by _YamlSource only.
_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("turboserve_yaml_data", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """The --config file as the lowest-priority settings source."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_yaml_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


# Routes reachable without the API key by default: probes and scrapers carry none.
OPEN_PATHS = ("/health", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """null (YAML's, or TURBOSERVE_X__Y=null) unsets a setting: a setting that cannot be null is back to its
        default (it was refused as "not a valid number"); one that can is null."""
        return _drop_nulls(cls, data)


def _drop_nulls(cls: type[BaseModel], data: Any) -> Any:
    """data without the null values of fields that cannot be null (so they take their defaults)."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields or _nullable(cls.model_fields[k])}


def _nullable(field: FieldInfo) -> bool:
    return type(None) in get_args(field.annotation)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    api_key: SecretStr | None = Field(None, description="If set, every route but api_key_open_paths needs `Authorization: Bearer <key>`.")
    api_key_file: str | None = Field(None, description="File holding the API key (e.g. a mounted Kubernetes secret), read at start; not with api_key.")
    api_key_open_paths: list[str] = Field(default_factory=lambda: list(OPEN_PATHS), description="Paths reachable without the API key (exact match); [] puts the probes and /metrics behind it too.")
    payload_limit: int = Field(2_000_000, ge=1024, description="Largest request body accepted, in bytes (413 above).")
    max_client_batch_size: int = Field(32, ge=1, description="Most inputs in one request (413 above).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty turns CORS off.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text: one readable line per record; json: one JSON object per line, for every log line (app and access).")
    request_timeout_s: float = Field(60.0, gt=0, le=86_400, description="Most seconds a request may wait for its result (504 after).")
    access_log: bool = Field(False, description="One line per request after its response: request id, route, status, bytes, timings (costs event-loop time under load).")
    model_dirs: list[str] = Field(default_factory=list, description="If set, model.path, reranker.path and recommend.model_path must resolve (symlinks followed) inside one of these folders; empty: anywhere. The embedded model is always allowed.")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="Also serve the KServe v2 gRPC protocol (tritonclient.grpc) on this port (Triton's is 8001; 0: any free port); off when null.")
    shared_memory: bool = Field(True, description="Triton's system shared memory extension (HTTP and gRPC): clients register /dev/shm objects for input and output tensors. It lets a client make the server read and write any shared memory object the server's user can open: turn it off when clients are not trusted.")
    shutdown_timeout_s: float = Field(30.0, gt=0, le=86_400, description="On SIGTERM: most seconds to finish admitted requests before exiting.")

    @model_validator(mode="after")
    def _check_security(self) -> ServerSettings:
        bad = [p for p in self.api_key_open_paths if not p.startswith("/")]
        if bad:
            raise ValueError(f"server.api_key_open_paths entries must start with '/': {bad}")
        if any(not d.strip() for d in self.model_dirs):
            raise ValueError("server.model_dirs holds an empty entry; leave the list empty for no restriction")
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("set one of server.api_key and server.api_key_file, not both")
            path = Path(self.api_key_file).expanduser()
            try:
                key = path.read_text().strip()  # a secret file usually ends with a newline
            except OSError as exc:
                raise ValueError(f"cannot read server.api_key_file {str(path)!r}: {exc.strerror}") from None
            if not key:
                raise ValueError(f"server.api_key_file {str(path)!r} is empty")
            self.api_key = SecretStr(key)
        if self.api_key is not None and not self.api_key.get_secret_value():
            raise ValueError("server.api_key is empty; leave it unset for no key")
        return self


class ModelSettings(_Section):
    path: str | None = Field(None, description="Hugging Face model folder; empty means the embedded all-MiniLM-L6-v2.")
    name: str | None = Field(None, description="Served model name (OpenAI `model`, KServe path); defaults to the folder's name.")
    aliases: list[str] = Field(default_factory=list, description="Other names a request's `model` field may give (as vLLM's several --served-model-name), e.g. the name client code was written for (text-embedding-3-small); a Hugging Face repo id ending in the served name (org/<name>) is always taken.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Compute dtype. CPU: float32, or bfloat16 (about 1.4x faster on CPUs with AVX512-BF16 or AMX; embeddings within cosine 0.9999 of float32). CUDA: float16 or bfloat16.")
    max_input_length: int | None = Field(None, ge=1, description="Most tokens an input may have; defaults to the model's own limit.")
    pooling: Literal["mean", "cls", "last", "splade"] | None = Field(None, description="Pooling override; defaults to the model's sentence-transformers config (splade for a *ForMaskedLM model).")
    classifier_from_token: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1, max_length=2, description="Serve a Qwen2/Qwen3/Mistral/Llama causal LM (the original Qwen3-Reranker) as a re-ranker whose score is its LM head's logit of this token, or of the second of two less the first's (vLLM's classifier_from_token: [\"no\", \"yes\"] for Qwen3-Reranker); null: the folder's own head.")
    normalize: bool | None = Field(None, description="Default L2 normalisation; defaults to the model's sentence-transformers config.")
    matryoshka_dimensions: list[Annotated[int, Field(ge=1)]] | None = Field(None, description="Output sizes the OpenAI `dimensions` field may ask for (each at most the model's output size); defaults to the model config's.")
    default_prompt_name: str | None = Field(None, description="Prompt (from the model's config_sentence_transformers.json) put before every text that names none; defaults to the model's own default_prompt_name.")
    default_prompt: str | None = Field(None, description="Text put before every text input that names no prompt (TEI's --default-prompt); not with default_prompt_name.")
    auto_truncate: bool = Field(False, description="Cut inputs over max_input_length when a request does not say (TEI's --auto-truncate; the OpenAI route always uses it).")
    num_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads on CPU; default leaves torch's choice. At most 1024: OpenMP fails (or crashes) creating tens of thousands.")
    warmup: bool = Field(True, description="Run a warm-up batch before reporting ready.")
    memory_arena: bool = Field(True, description="Plan every intermediate tensor of a batch into reusable chunks from its lifetime.")
    arena_min_chunk_mib: float = Field(2.0, gt=0, le=65_536, description="Smallest chunk the memory arena allocates, in MiB.")
    arena_release_after: int = Field(64, ge=1, description="Batches a chunk may go unused before the arena frees it.")
    cuda_graph_max_tokens: int = Field(4096, ge=0, description="On a GPU (float16/bfloat16), batches of up to this many tokens replay CUDA graphs captured at start-up per token bucket (one launch instead of one a kernel); 0: never.")

    @model_validator(mode="after")
    def _name_fits_a_path(self):
        if self.name is not None and "/" in self.name:  # Triton's names are folder names: no KServe path carries it
            raise ValueError(f"name {self.name!r} holds a '/', which no KServe path (/v2/models/<name>) can carry: "
                             f"serve it as {self.name.rpartition('/')[2]!r} (a Hugging Face repo id ending in the name is "
                             "taken in a request's `model` anyway) and list other names in aliases")
        return self

    @model_validator(mode="after")
    def _one_default_prompt(self):
        if self.default_prompt is not None and self.default_prompt_name is not None:
            raise ValueError("model.default_prompt and model.default_prompt_name are two ways to say the same thing: set one")
        return self


class SchedulerSettings(_Section):
    policy: Literal["dp", "token_budget", "fifo", "triton", "sort_slice"] = Field(
        "dp", description="Batch planner: dp (ours), or a baseline: token_budget (TEI), fifo, triton, sort_slice (infinity).")
    max_batch_tokens: int = Field(16384, ge=1, description="Most tokens in one batch (packed, so no padding counts).")
    max_batch_requests: int = Field(64, ge=1, description="Most sequences in one batch.")
    max_queue_size: int = Field(1024, ge=1, description="Most sequences waiting; more are refused with 429.")
    retry_after_s: int = Field(1, ge=1, description="Seconds sent in `Retry-After` with a 429.")
    slo_ms: float = Field(2000.0, gt=0, le=86_400_000, description="Default latency objective; a request's deadline is arrival + SLO (header x-slo-ms overrides).")
    fixed_batch_size: int = Field(32, ge=1, description="fifo: batch size it waits to fill.")
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8, 16, 32], description="triton: preferred batch sizes.")
    max_queue_delay_ms: float = Field(5.0, ge=0, le=3_600_000, description="fifo, triton: most ms the oldest request waits for a fuller batch.")
    late_grace_slos: float = Field(4.0, ge=0, le=1e6, description="dp: a request that can no longer meet its deadline runs after the others until this many SLOs past it.")
    max_wait_ms: float = Field(5.0, ge=0, le=3_600_000, description="dp: most ms the oldest request waits for a cheaper batch (never past a deadline).")
    shed_longest: bool = Field(True, description="dp: when not every deadline can be met, the longest requests go behind the others (Moore-Hodgson), so more are answered in time.")
    deadline_margin: float = Field(1.0, ge=0, le=10, description="dp: plans each request's slack as if batches ran the cost "
                                   "model's running p90 overrun to this power as long as predicted (0: as predicted), so that batches that "
                                   "run long do not push planned-just-in-time requests past their deadline.")
    margin_averaging: float = Field(0.0, ge=0, le=4, description="dp: the margin of a request whose slack holds k full "
                                    "batches is (overrun factor - 1) / k to this power, in planning and in overload shedding, for "
                                    "batches that overrun one by one (0, the default: the whole slack shrunk by the factor, as "
                                    "for a host whose batches overrun in spells).")
    shed_margin: float = Field(0.0, ge=0, le=10, description="dp: overload shedding (shed_longest) judges which requests "
                               "can still make it with the work ahead running the overrun factor to this power as long as "
                               "predicted (0, the default: as predicted; the planning margin keeps the rest in time).")
    order_tolerance: float = Field(0.01, ge=0, le=1, description="dp: cuts batches from the requests in deadline order unless "
                                   "the length-sorted cut is cheaper by more than this share of predicted time (0: the cheapest cut).")
    keep_up: float = Field(1.1, ge=0, le=10, description="dp: while the pending work is more than two SLOs, the next batch holds "
                           "at least the requests needed to serve this many times the arrival rate of the last 2 s (0: off).")
    partition_cost: Literal["profiled", "refined"] = Field("profiled", description="dp: the cost model that prices candidate "
                                                           "partitions: as profiled (or loaded), or as refined online (its knots wander "
                                                           "with the batches' scatter, and dp then picks partitions for that noise). "
                                                           "Deadlines are checked with the refined model either way.")
    plan_ahead: bool = Field(False, description="Every policy: plans the next batch while the current one runs (as if it starts "
                             "when the current one is predicted to end), so the device does not idle while the planner runs; "
                             "requests that arrive meanwhile wait for the plan after, unless one is more urgent than all it planned.")
    answer_after_plan: bool = Field(False, description="Every policy: hands out a batch's answers once the next batch is "
                                    "chosen (or before the worker would wait), so that writing them does not share the GIL "
                                    "with the planner while the device idles; answers then wait for the plan.")
    cost_model_dir: str | None = Field("~/.cache/turboserve", description="Where measured cost models are saved; empty: never saved.")
    profile: Literal["auto", "always"] = Field("auto", description="auto: load a saved cost model for this model/device/software, else measure; always: measure.")
    profile_runs: int = Field(3, ge=1, description="Timed runs per grid cell when measuring the cost model.")
    profile_max_tokens: int = Field(2048, ge=8, description="Largest batch (tokens) measured; bigger ones are extrapolated.")
    profile_budget_s: float = Field(120.0, ge=0, description="Most seconds the profile measures, cheapest cells first (a "
                                    "large model on a CPU: the rest are extrapolated); 0: no limit.")
    cost_model_alpha: float = Field(0.2, gt=0, le=1, description="Weight of one observed batch in the online refinement "
                                    "(EWMA of each knot's factor; larger values follow single batches' scatter).")


class EmbeddingSettings(_Section):
    """The hierarchical embedding parameter server (device cache -> volatile tier -> RocksDB)."""

    enabled: bool = Field(False, description="Serve embedding tables through the parameter server.")
    path: str = Field("~/.cache/turboserve/embeddings", min_length=1, description="RocksDB directory of the persistent tier (every row of every table).")
    sync_writes: bool = Field(True, description="fsync RocksDB's write-ahead log before an update is acknowledged (survives a machine crash).")
    cache_rows: int | None = Field(None, ge=1, description="Device cache rows per table; unset: cache_fraction of the table's rows.")
    cache_fraction: float = Field(0.2, gt=0, le=1, description="Device cache size as a fraction of each table's rows (HPS's default 0.2).")
    cache_ways: int = Field(16, ge=1, le=1024, description="Slots per set of the set-associative device cache.")
    cache_policy: Literal["lru", "lfu", "tinylfu"] = Field("lru", description="Device cache replacement within a set: least recently used, least frequently used, or TinyLFU (frequency sketch of every key, with admission).")
    cache_device: str | None = Field(None, description="torch device of the cache; default CUDA when present, else CPU.")
    volatile_backend: Literal["memory", "redis", "redis_cluster"] = Field("memory", description="Volatile tier: this process's memory, one Redis node, or a Redis Cluster.")
    redis_urls: list[str] = Field(default_factory=lambda: ["redis://127.0.0.1:6379"], min_length=1, description="redis: the node's URL; redis_cluster: startup nodes.")
    redis_timeout_s: float = Field(0.25, gt=0, le=60, description="Redis connect and read timeout; a slower call counts as a miss.")
    partitions: int = Field(16, ge=1, le=4096, description="Volatile tier partitions per table (by key hash).")
    partition_capacity: int = Field(1 << 20, ge=1, description="Most rows in one volatile partition.")
    overflow_policy: Literal["evict_random", "evict_least_used", "evict_oldest"] = Field("evict_oldest", description="Which rows a full partition evicts (least_used: memory backend only).")
    target_fill: float = Field(0.8, gt=0, le=1, description="Fraction of capacity a full partition is evicted down to.")
    volatile_preload: float = Field(0.0, ge=0, le=1, description="Fraction of each table's rows loaded from RocksDB into the volatile tier at start-up, in key order, before the server is ready (HPS's initial cache rate); at most the tier's capacity at target_fill. 0: the tier fills on misses.")
    async_defaults: bool = Field(False, description="High-hit-rate mode: above hit_rate_threshold, misses get default vectors now and are fetched in the background.")
    hit_rate_threshold: float = Field(0.9, ge=0, le=1, description="Device cache hit rate of a batch above which async_defaults applies.")
    max_keys: int = Field(65536, ge=1, description="Most keys in one lookup, update or recommendation request (413 above).")
    update_stream: str | None = Field(None, description="Redis stream of online updates to consume; empty: no consumer.")
    update_stream_url: str | None = Field(None, description="Redis holding the update stream; default the first of redis_urls.")
    update_group: str = Field("turboserve", min_length=1, description="Consumer group of the update stream; {consumer} and {hostname} are filled in. Replicas sharing one stream need one group each, e.g. 'turboserve-{consumer}'.")
    update_consumer: str | None = Field(None, description="Consumer name in the group; default the host name (stable across restarts).")
    update_batch: int = Field(64, ge=1, le=100_000, description="Most stream entries read at once.")
    update_block_ms: int = Field(1000, ge=1, le=60_000, description="How long one stream read waits for new entries, in ms.")
    update_claim_idle_ms: int = Field(30_000, ge=0, description="Entries another consumer left pending this long are taken over (XAUTOCLAIM).")
    update_publish: bool = Field(True, description="With update_stream: an HTTP update, once written here, is also XADDed to the stream so every replica applies it.")
    update_stream_maxlen: int | None = Field(1_000_000, ge=1, description="Published updates trim the stream to about this many entries; null: never trimmed.")
    update_settle_s: float = Field(2.0, ge=0, le=600, description="Seconds after applying a stream entry that the rows Redis and the device cache hold are rewritten from RocksDB (undoes an older row a lagging replica put in the shared Redis); 0: never.")

    @model_validator(mode="after")
    def _check_backend(self) -> EmbeddingSettings:
        if self.volatile_backend != "memory" and self.overflow_policy == "evict_least_used":
            raise ValueError(f"embeddings.overflow_policy={self.overflow_policy!r} needs volatile_backend='memory', "
                             f"not {self.volatile_backend!r}")
        if self.volatile_backend == "redis" and len(self.redis_urls) != 1:
            raise ValueError(f"embeddings.volatile_backend='redis' takes one URL, got redis_urls={self.redis_urls}")
        try:  # the same placeholders embeddings/stream.py's group_name fills in
            self.update_group.format(consumer="c", hostname="h")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"embeddings.update_group={self.update_group!r} may hold only {{consumer}} and {{hostname}}") from None
        return self


class RecommendSettings(_Section):
    """A DLRM recommendation model whose embedding rows live in the parameter server (needs embeddings.enabled)."""

    model_path: str | None = Field(None, description="DLRM folder (config.json + model.safetensors); empty: no recommendation model.")
    name: str | None = Field(None, description="Served name of the DLRM (KServe path); defaults to the folder's name.")
    max_batch: int = Field(4096, ge=1, description="Most samples in one recommendation request (413 above).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the DLRM's dense part (MLPs, interaction); scores are float32 either way. bfloat16: about 2x faster MLPs on CPUs with AMX (scores within ~0.003 of float32); float16: GPUs.")

    @model_validator(mode="after")
    def _name_fits_a_path(self):
        if self.name is not None and "/" in self.name:  # as model.name: the DLRM is served on KServe's paths
            raise ValueError(f"name {self.name!r} holds a '/', which no KServe path (/v2/models/<name>) can carry")
        return self


class Settings(BaseSettings):
    """All of turboserve's settings, grouped by the component that reads them."""

    # env_parse_none_str: TURBOSERVE_X__Y=null unsets a setting (a YAML file's value included), as YAML's null does.
    model_config = SettingsConfigDict(env_prefix="TURBOSERVE_", env_nested_delimiter="__", extra="forbid",
                                      env_parse_none_str="null")

    server: ServerSettings = Field(default_factory=ServerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    reranker: ModelSettings | None = Field(None, description="A cross-encoder (or classifier) served beside an embedding model, for the re-ranking and classification routes: one server for a RAG pipeline's two models. Its own queue and batching worker; the scheduler settings are shared.")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    embeddings: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    recommend: RecommendSettings = Field(default_factory=RecommendSettings)

    @model_validator(mode="before")
    @classmethod
    def _null_section_is_the_default(cls, data: Any) -> Any:
        """A section that is null (a YAML section whose every line is commented out, or TURBOSERVE_MODEL=null) is its
        defaults, as a null setting is; reranker, which can be null, stays null."""
        return _drop_nulls(cls, data)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        for section, model in (("model", self.model), ("reranker", self.reranker)):
            limit = model.max_input_length if model is not None else None
            if limit is not None and self.scheduler.max_batch_tokens < limit:
                raise ValueError(
                    f"scheduler.max_batch_tokens={self.scheduler.max_batch_tokens} must be >= "
                    f"{section}.max_input_length={limit}: a longest input would never fit in a batch"
                )
        sched = self.scheduler
        if sched.policy == "fifo" and sched.fixed_batch_size > sched.max_batch_requests:
            raise ValueError(f"scheduler.fixed_batch_size={sched.fixed_batch_size} is more than scheduler.max_batch_requests="
                             f"{sched.max_batch_requests}: fifo would wait for batches it can never form")
        too_big = [s for s in sched.preferred_batch_sizes if s > sched.max_batch_requests]
        if sched.policy == "triton" and too_big:  # as Triton refuses a preferred size over max_batch_size
            raise ValueError(f"scheduler.preferred_batch_sizes {too_big} are more than scheduler.max_batch_requests="
                             f"{sched.max_batch_requests}")
        if self.reranker is not None and not self.reranker.path:
            raise ValueError("reranker.path must name a cross-encoder (or classifier) model folder")
        if self.server.max_client_batch_size > self.scheduler.max_queue_size:
            raise ValueError(
                f"server.max_client_batch_size={self.server.max_client_batch_size} must be <= "
                f"scheduler.max_queue_size={self.scheduler.max_queue_size}: a largest request could never be admitted"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: explicit overrides (init kwargs), then the environment, then the YAML file.
        return init_settings, env_settings, _YamlSource(settings_cls)


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from an optional YAML file, the environment and explicit overrides.

    Priority: `overrides` (CLI flags) > environment > YAML > defaults. Raises pydantic's
    ValidationError (naming the field) or ValueError for an unreadable file.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"cannot read config file {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                             f"offset {exc.start})") from None
        except yaml.YAMLError as exc:  # where and what only: PyYAML's own text quotes the line, which may hold a key
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', None) or 'cannot parse'}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    token = _yaml_data.set(data)
    try:
        return Settings(**(overrides or {}))
    except SettingsError as exc:  # pydantic-settings names only the section: name the variables it could not read
        bad = _unparsable_env()
        raise ValueError(f"{exc}: " + (f"{', '.join(bad)} must hold JSON (a list is ['a', 'b'] in JSON: "
                                       '\'["a", "b"]\')' if bad else "check the TURBOSERVE_* variables")) from None
    finally:
        _yaml_data.reset(token)


def _env_fields() -> dict[str, FieldInfo]:
    """Every setting's environment variable (TURBOSERVE_<SECTION>__<FIELD>, and TURBOSERVE_<SECTION> for a whole
    section) -> its field."""
    names = {}
    for section, field in Settings.model_fields.items():
        names[f"TURBOSERVE_{section.upper()}"] = field
        for name, inner in getattr(field.annotation, "model_fields", {}).items():
            names[f"TURBOSERVE_{section.upper()}__{name.upper()}"] = inner
    return names


def unknown_env() -> list[str]:
    """TURBOSERVE_* variables that name no setting (a typo is otherwise ignored without a word); the CUDA
    emulator's own switches (TURBOSERVE_EMULATE*) are not settings."""
    known, sections = _env_fields(), {f"TURBOSERVE_{s.upper()}__" for s in Settings.model_fields}
    # One under a known section is refused at validation, naming it ("extra inputs are not permitted"): not ignored.
    return sorted(n for n in os.environ if n.startswith("TURBOSERVE_") and n not in known and not n.startswith("TURBOSERVE_EMULATE")
                  and not any(n.startswith(s) for s in sections))


def _unparsable_env() -> list[str]:
    """Variables of a list or mapping setting whose value is not JSON."""
    bad = []
    for name, field in _env_fields().items():
        if name in os.environ and ("list" in str(field.annotation) or "dict" in str(field.annotation)):
            try:
                json.loads(os.environ[name])
            except ValueError:
                bad.append(name)
    return sorted(bad)


class PathNotAllowed(ValueError):
    """A model path that resolves outside server.model_dirs."""


def check_model_dirs(settings: Settings) -> None:
    """Raise PathNotAllowed when server.model_dirs is set and model.path, reranker.path or recommend.model_path resolves
    (after `~` and every symlink) outside all of them. model.path unset (the embedded model) always passes.

    The folder itself is checked, not each file inside it: links inside an allowed folder are trusted.
    """
    if not settings.server.model_dirs:
        return
    allowed = [Path(d).expanduser().resolve() for d in settings.server.model_dirs]
    reranker = settings.reranker.path if settings.reranker is not None else None
    for name, value in (("model.path", settings.model.path), ("reranker.path", reranker),
                        ("recommend.model_path", settings.recommend.model_path)):
        if not value:
            continue
        resolved = Path(value).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in allowed):
            where = f" (resolves to {resolved})" if str(resolved) != value else ""
            raise PathNotAllowed(f"{name} {value}{where} is outside server.model_dirs: {', '.join(map(str, allowed))}")
