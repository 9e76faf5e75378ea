"""config.json of the architectures beyond the BERT family's layout, parsed into models/config.py's EncoderConfig:
decoder-only embedders (Qwen2, Qwen3; models/decoder.py), Gemma3's (EmbeddingGemma; models/gemma.py) and ModernBERT
(models/modernbert.py). Each refuses, with a one-line reason, what its module does not compute."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.activation import ACTIVATION_NAMES
from models.config import EncoderConfig, ModelFolderError

# ModernBERT's feed-forward activations (transformers' ACT2FN names) -> the kind models/encoder.py's _activation_ runs
MODERNBERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu",
                          "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class DecoderParts:
    """What a decoder-only embedder adds to EncoderConfig: grouped-query attention (num_kv_heads key/value heads of
    head_dim, shared by num_heads // num_kv_heads query heads each), rotary positions of base rope_theta, whether
    attention is causal, and its optional parts: biases of the query/key/value and output projections, and Qwen3's
    RMSNorm of each query and key head. The feed-forward block is gated: down(act(gate(x)) * up(x)).

    Gemma3 (models/gemma.py) adds which layers attend within a window (`local_layers`, one flag a layer: the tokens at
    most `window` places from a token, either side), those layers' rotary base, and the attention's scale
    query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5)."""

    num_kv_heads: int
    head_dim: int
    rope_theta: float
    causal: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    local_layers: tuple[bool, ...] = ()
    window: int | None = None
    local_rope_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None


def decoder_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A Qwen2 or Qwen3 config.json (transformers 4's rope_theta or 5's rope_parameters); refused where it asks for
    what models/decoder.py does not compute (scaled rotary positions, sliding-window attention). Gemma3's: gemma_config."""
    if cfg["model_type"] == "gemma3_text":
        return gemma_config(cls, cfg, matryoshka)
    model_type, heads, activation = cfg["model_type"], cfg["num_attention_heads"], cfg.get("hidden_act", "silu")
    rope = cfg.get("rope_parameters") or {}
    for given in (rope, cfg.get("rope_scaling") or {}):  # transformers 5's, and 4's
        if (kind := given.get("rope_type", given.get("type", "default"))) != "default":
            raise ModelFolderError(f"config.json's rotary scaling {kind!r} is not supported (plain rotary positions are)")
    if activation not in ACTIVATION_NAMES:
        raise ModelFolderError(f"config.json's hidden_act {activation!r} is not supported (supported: "
                               f"{', '.join(ACTIVATION_NAMES)})")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ModelFolderError("sliding-window attention (use_sliding_window) is not supported")
    if cfg.get("auto_map") and "is_causal" not in cfg:
        raise ModelFolderError(f"config.json names custom modeling code (auto_map); turboserve computes transformers' own "
                               f"{model_type}, whose attention is causal, and custom code may differ (gte-Qwen2's is "
                               "bidirectional): add \"is_causal\": false to config.json for bidirectional attention, or "
                               "\"is_causal\": true for causal")
    qwen3 = model_type == "qwen3"
    parts = DecoderParts(
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        causal=bool(cfg.get("is_causal", True)),  # transformers 5 reads this key too
        qkv_bias=bool(cfg.get("attention_bias", False)) if qwen3 else True,
        out_bias=bool(cfg.get("attention_bias", False)) if qwen3 else False,
        qk_norm=qwen3,
    )
    if heads % parts.num_kv_heads:
        raise ModelFolderError(f"config.json: num_attention_heads={heads} is not a multiple of "
                               f"num_key_value_heads={parts.num_kv_heads}")
    return _built(cls, cfg, model_type, 32768, cfg.get("rms_norm_eps", 1e-6), activation, matryoshka, decoder=parts)


def gemma_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A Gemma3 text config.json (EmbeddingGemma's), as transformers 4 (rope_theta, rope_local_base_freq) or 5
    (rope_parameters per layer type) writes it; refused where it asks for what models/gemma.py does not compute
    (causal attention, attention logit softcapping, scaled rotary positions, other activations or layer types)."""
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if not cfg.get("use_bidirectional_attention", False):
        raise ModelFolderError("a causal Gemma3 (use_bidirectional_attention false) is not supported; EmbeddingGemma's "
                               "bidirectional one is")
    if cfg.get("attn_logit_softcapping") is not None:
        raise ModelFolderError(f"config.json's attn_logit_softcapping={cfg['attn_logit_softcapping']!r} is not "
                               "supported (attention scores without softcapping are)")
    if activation not in ACTIVATION_NAMES:
        raise ModelFolderError(f"config.json's hidden_activation {activation!r} is not supported (supported: "
                               f"{', '.join(ACTIVATION_NAMES)})")
    types = cfg.get("layer_types")
    if not types:  # transformers' default: every `sliding_window_pattern`-th layer full, the others sliding
        every = cfg.get("sliding_window_pattern", 6)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ModelFolderError(f"config.json's sliding_window_pattern={every!r} must be a whole number >= 1")
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ModelFolderError(f"config.json's layer_types must name full_attention or sliding_attention for each of "
                               f"its {layers} layers; got {types}")
    # config.json's sliding_window W counts both sides: bidirectional, transformers attends where |i - j| < W // 2 + 1
    sliding = cfg.get("sliding_window")
    if "sliding_attention" in types and (not isinstance(sliding, int) or isinstance(sliding, bool) or sliding < 0):
        raise ModelFolderError(f"config.json's sliding_window={sliding!r} must be a whole number of tokens")
    rope = cfg.get("rope_parameters") or {}
    over = {"rope_type" if key == "type" else key: value for key, value in (cfg.get("rope_scaling") or {}).items()}
    theta = {}
    for kind, old_key, default in (("full_attention", "rope_theta", 1_000_000.0),
                                   ("sliding_attention", "rope_local_base_freq", 10_000.0)):
        params = {**(rope.get(kind) or {}), **(over if kind == "full_attention" else {})}  # rope_scaling: full layers'
        if (scaling := params.get("rope_type", "default")) != "default":
            raise ModelFolderError(f"config.json's rotary scaling {scaling!r} is not supported (plain rotary positions are)")
        theta[kind] = float(params.get("rope_theta", cfg.get(old_key) or default))
    bias = bool(cfg.get("attention_bias", False))
    parts = DecoderParts(
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta["full_attention"],
        causal=False,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm=True,
        local_layers=tuple(t == "sliding_attention" for t in types),
        window=sliding // 2 if "sliding_attention" in types else None,
        local_rope_theta=theta["sliding_attention"],
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
    )
    if heads % parts.num_kv_heads:
        raise ModelFolderError(f"config.json: num_attention_heads={heads} is not a multiple of "
                               f"num_key_value_heads={parts.num_kv_heads}")
    return _built(cls, cfg, "gemma3_text", 131072, cfg.get("rms_norm_eps", 1e-6), activation, matryoshka, decoder=parts)


@dataclass(frozen=True)
class ModernBertParts:
    """What ModernBERT adds to EncoderConfig: rotary positions (base global_rope_theta in global layers,
    local_rope_theta in local ones), which layers are local (`local_layers`, one flag a layer: attention within
    local_attention // 2 tokens either side), and which of its LayerNorms and Linears have biases."""

    local_layers: tuple[bool, ...]
    local_attention: int
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # a ModernBertForSequenceClassification's head: dense (with a bias or not) + this activation + LayerNorm
    classifier_bias: bool = False
    classifier_activation: str = "gelu"

    @property
    def window(self) -> int:
        """How far from a token a local layer's attention reaches, either side (transformers' sliding_window)."""
        return self.local_attention // 2


def modernbert_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A ModernBERT config.json, as transformers 4 (global_attn_every_n_layers, global/local_rope_theta) or 5
    (layer_types, rope_parameters per layer type) writes it; refused where it asks for what models/modernbert.py does
    not compute (scaled rotary positions, other activations, other layer types)."""
    hidden, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    if hidden % heads:
        raise ModelFolderError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    activation, head_activation = cfg.get("hidden_activation", "gelu"), cfg.get("classifier_activation", "gelu")
    for key, name in (("hidden_activation", activation), ("classifier_activation", head_activation)):
        if name not in MODERNBERT_ACTIVATIONS:
            raise ModelFolderError(f"config.json's {key} {name!r} is not supported "
                                   f"(supported: {', '.join(MODERNBERT_ACTIVATIONS)})")
    types = cfg.get("layer_types")
    if not types:  # transformers 4: every n-th layer global, from layer 0 (transformers 5 reads it so too)
        every = cfg.get("global_attn_every_n_layers", 3)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ModelFolderError(f"config.json's global_attn_every_n_layers={every!r} must be a whole number >= 1")
        types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ModelFolderError(f"config.json's layer_types must name full_attention or sliding_attention for each of "
                               f"its {layers} layers; got {types}")
    local_attention = cfg.get("local_attention", 128)
    if not isinstance(local_attention, int) or isinstance(local_attention, bool) or local_attention < 0:
        raise ModelFolderError(f"config.json's local_attention={local_attention!r} must be a whole number of tokens")
    rope = cfg.get("rope_parameters") or {}
    # transformers 4's rope_scaling (its "type" is rope_type) is laid over both kinds' parameters, as transformers 5 does
    over = {"rope_type" if key == "type" else key: value for key, value in (cfg.get("rope_scaling") or {}).items()}
    theta = {}
    for kind, old_key, default in (("full_attention", "global_rope_theta", 160000.0),
                                   ("sliding_attention", "local_rope_theta", 10000.0)):
        params = {**(rope.get(kind) or {}), **over}
        scaling = params.get("rope_type", "default")
        if scaling != "default":
            raise ModelFolderError(f"config.json's rotary scaling {scaling!r} is not supported (plain rotary positions are)")
        theta[kind] = float(params.get("rope_theta", cfg.get(old_key) or default))
    parts = ModernBertParts(
        local_layers=tuple(t == "sliding_attention" for t in types),
        local_attention=local_attention,
        global_rope_theta=theta["full_attention"],
        local_rope_theta=theta["sliding_attention"],
        norm_bias=bool(cfg.get("norm_bias", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        classifier_bias=bool(cfg.get("classifier_bias", False)),
        classifier_activation=head_activation,
    )
    return _built(cls, cfg, "modernbert", 8192, cfg.get("norm_eps", 1e-5), activation, matryoshka, modernbert=parts)


def _built(cls, cfg: dict, model_type: str, max_positions: int, eps: float, activation: str,
           matryoshka: tuple[int, ...], **parts) -> EncoderConfig:
    """The EncoderConfig of these architectures: the sizes config.json names alike, no token types, and `parts`
    (decoder= or modernbert=)."""
    return cls(model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               num_heads=cfg["num_attention_heads"], num_layers=cfg["num_hidden_layers"],
               intermediate_size=cfg["intermediate_size"],
               max_positions=cfg.get("max_position_embeddings", max_positions), type_vocab_size=0, layer_norm_eps=eps,
               activation=activation, matryoshka_dimensions=matryoshka, **parts)
