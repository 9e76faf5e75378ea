"""config.json of the architectures beyond the BERT family's layout, parsed into models/config.py's EncoderConfig:
decoder-only embedders (Qwen2, Qwen3, Mistral, Llama; models/decoder.py), Gemma3's (EmbeddingGemma; models/gemma.py)
and ModernBERT (models/modernbert.py); NomicBERT's and GTE's are models/rotary_bert_config.py's. Each refuses, with a
one-line reason, what its module does not compute."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from kernels.activation import ACTIVATION_NAMES
from models.config import EncoderConfig, ModelFolderError


@dataclass(frozen=True)
class RotaryScaling:
    """transformers' rotary scaling of a decoder's frequencies (models/decoder.py's scaled_frequencies computes it):
    "linear" divides every frequency by `factor` (positions divided by it); "llama3" (Llama 3.1's) divides by `factor`
    those whose wavelength 2π / f is over original_positions / low_freq_factor, keeps those under original_positions /
    high_freq_factor, and blends the two in between."""

    rope_type: str  # one of DECODER_SCALINGS
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_positions: int = 8192  # config.json's original_max_position_embeddings


# the rotary scalings (transformers' rope_type) models/decoder.py computes for Qwen2, Qwen3, Mistral and Llama
DECODER_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True)
class DecoderParts:
    """What a decoder-only embedder adds to EncoderConfig: grouped-query attention (num_kv_heads key/value heads of
    head_dim, shared by num_heads // num_kv_heads query heads each), rotary positions of base rope_theta, whether
    attention is causal, and its optional parts: biases of the query/key/value and output projections, Qwen3's
    RMSNorm of each query and key head, and Llama's biases of the feed-forward block's three projections (mlp_bias).
    The feed-forward block is gated: down(act(gate(x)) * up(x)). `rope_scaling`: the frequencies' linear or Llama 3
    scaling, None for plain rotary positions.

    Mistral's sliding window sets `window` (sliding_window - 1): causal attention within it, each token sees itself
    and the `window` tokens before it, in every layer.

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
    mlp_bias: bool = False
    rope_scaling: RotaryScaling | None = None


# model_type -> max_position_embeddings where config.json leaves it out (transformers' defaults)
_DECODER_POSITIONS = {"qwen2": 32768, "qwen3": 32768, "mistral": 131072, "llama": 2048}


def decoder_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A Qwen2, Qwen3, Mistral or Llama config.json (transformers 4's rope_theta and rope_scaling or 5's
    rope_parameters); refused where it asks for what models/decoder.py does not compute (rotary scalings but linear
    and Llama 3's, Qwen2's per-layer sliding windows).
    Gemma3's: gemma_config.

    Mistral's sliding_window (4096 in e5-mistral-7b-instruct's config.json; null in some) is computed exactly rather
    than the served length capped at it: FlashAttention's varlen kernel takes a causal mask and a left window together
    and the CPU path's band mask is one comparison more than the causal one, so a text longer than the window gets
    transformers' vectors, where a cap would refuse or cut texts that sentence-transformers embeds whole."""
    if cfg["model_type"] == "gemma3_text":
        return gemma_config(cls, cfg, matryoshka)
    model_type, heads, activation = cfg["model_type"], cfg["num_attention_heads"], cfg.get("hidden_act", "silu")
    _check_activation("hidden_act", activation)
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ModelFolderError("sliding-window attention (use_sliding_window) is not supported")
    positions = cfg.get("max_position_embeddings", _DECODER_POSITIONS[model_type])
    theta, scaling = _decoder_rotary(cfg, 10000.0, positions)
    if cfg.get("auto_map") and "is_causal" not in cfg:
        raise ModelFolderError(f"config.json names custom modeling code (auto_map); turboserve computes transformers' own "
                               f"{model_type}, whose attention is causal, and custom code may differ (gte-Qwen2's is "
                               "bidirectional): add \"is_causal\": false to config.json for bidirectional attention, or "
                               "\"is_causal\": true for causal")
    # Qwen2: q/k/v biases always; Qwen3 and Llama: q/k/v and o biases together when attention_bias; Mistral: none
    bias = bool(cfg.get("attention_bias", False)) and model_type in ("qwen3", "llama")
    parts = DecoderParts(
        num_kv_heads=_kv_heads(cfg),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta,
        rope_scaling=scaling,
        causal=bool(cfg.get("is_causal", True)),  # transformers 5 reads this key too
        qkv_bias=bias or model_type == "qwen2",
        out_bias=bias,
        qk_norm=model_type == "qwen3",
        window=_mistral_window(cfg, positions) if model_type == "mistral" else None,
        mlp_bias=bool(cfg.get("mlp_bias", False)) and model_type == "llama",
    )
    if parts.window is not None and not parts.causal:
        raise ModelFolderError("a bidirectional Mistral (is_causal false) with a sliding_window is not supported; set "
                               "sliding_window to null for bidirectional attention over the whole text")
    return _built(cls, cfg, model_type, positions, cfg.get("rms_norm_eps", 1e-6), activation, matryoshka, decoder=parts)


def _decoder_rotary(cfg: dict, default: float, positions: int) -> tuple[float, RotaryScaling | None]:
    """A decoder's rotary base and scaling as transformers 5 reads config.json: transformers 4's rope_scaling (its
    "type" is rope_type) where given, else 5's rope_parameters, the base from that or the top-level rope_theta; Llama
    3's original_max_position_embeddings from the top level, that dict, or max_position_embeddings, in that order.
    Scalings but DECODER_SCALINGS refused, in either dict."""
    _refuse_scalings(cfg, DECODER_SCALINGS)
    params = rope_dict(cfg, "rope_scaling") or rope_dict(cfg, "rope_parameters")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", default)))
    if (kind := params.get("rope_type", "default")) == "default":
        return theta, None
    number = partial(_rope_number, params, kind)
    if kind == "linear":
        return theta, RotaryScaling("linear", number("factor"))
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if high <= low:
        raise ModelFolderError(f"config.json's llama3 rotary scaling needs high_freq_factor > low_freq_factor; got "
                               f"{high} and {low}")
    key = "original_max_position_embeddings"
    original = _whole({key: cfg.get(key, params.get(key, positions))}, key, None, 1)
    return theta, RotaryScaling("llama3", number("factor"), low, high, original)


def _rope_number(params: dict, kind: str, key: str) -> float:
    """The rotary scaling's number `key` (> 0), refused where missing."""
    value = params.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ModelFolderError(f"config.json's {kind} rotary scaling needs a number {key} > 0; got {value!r}")
    return float(value)


def _mistral_window(cfg: dict, positions: int) -> int | None:
    """How many tokens before it a token of a Mistral sees (transformers: key j where i - sliding_window < j <= i),
    None where config.json's sliding_window is null or spans every position."""
    if cfg.get("sliding_window") is None:
        return None
    sliding = _whole(cfg, "sliding_window", None, 1)
    return sliding - 1 if sliding < positions else None


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
    _check_activation("hidden_activation", activation)
    # transformers' default: every `sliding_window_pattern`-th layer full, the others sliding
    every = _whole(cfg, "sliding_window_pattern", 6, 1)
    local = _local_layers(cfg, layers, lambda i: (i + 1) % every != 0)
    # config.json's sliding_window W counts both sides: bidirectional, transformers attends where |i - j| < W // 2 + 1
    sliding = _whole(cfg, "sliding_window", None, 0) if any(local) else None
    # transformers 4's rope_scaling is the full layers' (rope_local_base_freq the sliding ones' base)
    theta = _thetas(cfg, ("rope_theta", 1_000_000.0), ("rope_local_base_freq", 10_000.0), scaled_local=False)
    bias = bool(cfg.get("attention_bias", False))
    parts = DecoderParts(
        num_kv_heads=_kv_heads(cfg),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta[False],
        causal=False,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm=True,
        local_layers=local,
        window=None if sliding is None else sliding // 2,
        local_rope_theta=theta[True],
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
    )
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
    _check_activation("hidden_activation", activation)
    _check_activation("classifier_activation", head_activation)
    # transformers 4: every n-th layer global, from layer 0 (transformers 5 reads it so too)
    every = _whole(cfg, "global_attn_every_n_layers", 3, 1)
    local = _local_layers(cfg, layers, lambda i: i % every != 0)
    # transformers 4's rope_scaling is laid over both kinds' parameters, as transformers 5 does
    theta = _thetas(cfg, ("global_rope_theta", 160000.0), ("local_rope_theta", 10000.0), scaled_local=True)
    parts = ModernBertParts(
        local_layers=local,
        local_attention=_whole(cfg, "local_attention", 128, 0),
        global_rope_theta=theta[False],
        local_rope_theta=theta[True],
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


def _check_activation(key: str, name: str) -> None:
    """ModelFolderError unless the kernels (and the CPU path's activate_) run the activation config.json names."""
    if name not in ACTIVATION_NAMES:
        raise ModelFolderError(f"config.json's {key} {name!r} is not supported (supported: {', '.join(ACTIVATION_NAMES)})")


def _whole(cfg: dict, key: str, default: int | None, least: int) -> int:
    """config.json's whole number `key` (default when absent), refused below `least`."""
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ModelFolderError(f"config.json's {key}={value!r} must be a whole number >= {least}")
    return value


def _kv_heads(cfg: dict) -> int:
    """num_key_value_heads (num_attention_heads when absent), refused unless it divides the query heads."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        raise ModelFolderError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return kv


def _local_layers(cfg: dict, layers: int, local_by_default) -> tuple[bool, ...]:
    """Which layers attend within a window: config.json's layer_types (transformers 5), else local_by_default(i)."""
    types = cfg.get("layer_types") or ["sliding_attention" if local_by_default(i) else "full_attention"
                                       for i in range(layers)]
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ModelFolderError(f"config.json's layer_types must name full_attention or sliding_attention for each of "
                               f"its {layers} layers; got {types}")
    return tuple(t == "sliding_attention" for t in types)


def _thetas(cfg: dict, full: tuple[str, float], local: tuple[str, float], scaled_local: bool) -> dict[bool, float]:
    """Rotary bases of full (False) and local (True) layers: transformers 5's rope_parameters per layer type, else 4's
    keys (full[0], local[0]) or their defaults; any scaling refused, transformers 4's rope_scaling (its "type" is
    rope_type) counting for full layers, and for local ones too when `scaled_local`."""
    rope = cfg.get("rope_parameters") or {}
    over = rope_dict(cfg, "rope_scaling")
    theta = {}
    for is_local, kind, (old_key, default) in ((False, "full_attention", full), (True, "sliding_attention", local)):
        params = {**(rope.get(kind) or {}), **(over if scaled_local or not is_local else {})}
        if (scaling := params.get("rope_type", "default")) != "default":
            raise ModelFolderError(f"config.json's rotary scaling {scaling!r} is not supported (plain rotary positions are)")
        theta[is_local] = float(params.get("rope_theta", cfg.get(old_key) or default))
    return theta


def _plain_theta(cfg: dict, default: float, also: tuple[str, ...]) -> float:
    """The rotary base of transformers 5's rope_parameters or 4's rope_theta; scaling refused but the kinds in `also`
    (which the caller applies)."""
    _refuse_scalings(cfg, also)
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", default)))


def rope_dict(cfg: dict, key: str) -> dict:
    """config.json's rope_scaling (transformers 4's, whose "type" is rope_type) or rope_parameters (5's) under
    transformers 5's key names; {} where absent."""
    return {"rope_type" if k == "type" else k: v for k, v in (cfg.get(key) or {}).items()}


def _refuse_scalings(cfg: dict, served: tuple[str, ...]) -> None:
    """ModelFolderError for a rotary scaling, in rope_parameters or rope_scaling, other than the `served` kinds."""
    for key in ("rope_parameters", "rope_scaling"):
        if (kind := rope_dict(cfg, key).get("rope_type", "default")) not in ("default", *served):
            names = ["plain", *served]
            allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            raise ModelFolderError(f"config.json's rotary scaling {kind!r} is not supported ({allowed} rotary positions are)")
