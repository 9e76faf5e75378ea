"""config.json of NomicBERT and GTE (models/rotary_bert.py), in the custom code's layout (what the published folders
and TEI use) or transformers 5's, parsed into models/config.py's EncoderConfig; each refuses, with a one-line reason,
what models/rotary_bert.py does not compute."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.arch_config import _built, _check_activation, _plain_theta, _whole, rope_dict
from models.config import EncoderConfig, ModelFolderError


@dataclass(frozen=True)
class RotaryBertParts:
    """What NomicBERT (nomic-embed-text) and GTE (Alibaba's "new" architecture: gte-*-v1.5, gte-multilingual-base)
    add to EncoderConfig: BERT's post-norm layers with rotary positions of base rope_theta, every frequency divided by
    rope_scale (1 but for GTE's NTK scaling), in place of position embeddings, and a gated feed-forward block
    down(act(gate(x)) * up(x)); and which projections have biases (NomicBERT's none, GTE's all but up and gate)."""

    rope_theta: float
    rope_scale: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    down_bias: bool = False


# NomicBERT's original config.json (its custom code's, which TEI reads): each key, and the value turboserve computes
_NOMIC_FIXED = {"rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_scaling_factor": None,
                "rotary_emb_scale_base": None, "prenorm": False, "parallel_block": False, "use_rms_norm": False,
                "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False}
# its gated activation_function -> the activation of the gate
_NOMIC_GATES = {"swiglu": "silu", "geglu": "gelu"}


def nomic_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A NomicBERT config.json: the original one of nomic-embed-text's custom code (n_embd, n_head, ..., rotary_emb_base,
    activation_function "swiglu"), or transformers 5's own (hidden_size, ..., rope_parameters, hidden_act); refused
    where it asks for what models/rotary_bert.py does not compute (partial, interleaved or scaled rotary positions,
    pre-norm or parallel blocks, RMSNorm, biases, causal attention)."""
    if "n_embd" not in cfg:  # transformers 5's layout
        theta = _plain_theta(cfg, 1000.0, ())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
            raise ModelFolderError(f"config.json's head_dim={head_dim} times num_attention_heads must be hidden_size")
        activation = cfg.get("hidden_act", "silu")
        _check_activation("hidden_act", activation)
        return _rotary_built(cls, cfg, "nomic_bert", 2048, activation, matryoshka, RotaryBertParts(rope_theta=theta),
                             types=cfg.get("type_vocab_size", 2))
    for key, wanted in _NOMIC_FIXED.items():
        if cfg.get(key, wanted) != wanted:
            raise ModelFolderError(f"config.json's {key}={cfg[key]!r} is not supported (NomicBERT with {key}={wanted!r} is)")
    gate = cfg.get("activation_function", "swiglu")
    if gate not in _NOMIC_GATES:
        raise ModelFolderError(f"config.json's activation_function {gate!r} is not supported (gated: "
                               f"{', '.join(_NOMIC_GATES)})")
    hidden = cfg["n_embd"]
    if not cfg.get("n_inner"):  # the custom code's default is rounded in ways its configs never rely on
        raise ModelFolderError("config.json has no n_inner (the gated feed-forward block's width)")
    vocab, multiple = cfg["vocab_size"], _whole(cfg, "pad_vocab_size_multiple", 1, 1)
    native = {"vocab_size": -(-vocab // multiple) * multiple,  # the custom code pads its embedding table so
              "hidden_size": hidden, "num_attention_heads": cfg["n_head"],
              "num_hidden_layers": cfg["n_layer"], "intermediate_size": cfg["n_inner"],
              "max_position_embeddings": cfg.get("n_positions", 2048),
              "layer_norm_eps": cfg.get("layer_norm_epsilon", 1e-5)}
    parts = RotaryBertParts(rope_theta=float(cfg.get("rotary_emb_base", 10000.0)))
    return _rotary_built(cls, native, "nomic_bert", 2048, _NOMIC_GATES[gate], matryoshka, parts,
                         types=cfg.get("type_vocab_size", 2))


def gte_config(cls, cfg: dict, matryoshka: tuple[int, ...]) -> EncoderConfig:
    """A GTE config.json: the original one of Alibaba-NLP's custom code (model_type "new": rope_theta, rope_scaling of
    type "ntk") or transformers 5's own ("gte": rope_parameters); refused where it asks for what models/rotary_bert.py
    does not compute (other position embeddings or norms, attention's log-n scaling, unpacked q/k/v weights).

    NTK scaling by a factor f, as the custom code (and TEI) compute it: the base becomes rope_theta * f and every
    frequency is divided by f ** (2 / head_dim)."""
    for key, wanted in (("position_embedding_type", "rope"), ("layer_norm_type", "layer_norm"),
                        ("logn_attention_scale", False), ("pack_qkv", True)):
        if cfg.get(key, wanted) != wanted:
            raise ModelFolderError(f"config.json's {key}={cfg[key]!r} is not supported (GTE with {key}={wanted!r} is)")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    factor = 1.0
    scaling = rope_dict(cfg, "rope_scaling")
    if scaling.get("rope_type") == "ntk":
        factor = float(scaling.get("factor", 1.0))
        if factor < 1.0 or scaling.get("mixed_b") is not None:
            raise ModelFolderError(f"config.json's rope_scaling {scaling} is not supported (NTK scaling by a factor "
                                   ">= 1, without mixed_b, is)")
    theta = _plain_theta(cfg, 10000.0 if cfg["model_type"] == "new" else 160000.0, ("ntk",)) * factor
    activation = cfg.get("hidden_act", "gelu")
    _check_activation("hidden_act", activation)
    parts = RotaryBertParts(rope_theta=theta, rope_scale=factor ** (2 / head_dim), qkv_bias=True, out_bias=True,
                            down_bias=True)
    types = cfg.get("type_vocab_size", 0 if cfg["model_type"] == "new" else 1)
    return _rotary_built(cls, cfg, "gte", 8192, activation, matryoshka, parts, types=types)


def _rotary_built(cls, cfg: dict, model_type: str, max_positions: int, activation: str, matryoshka: tuple[int, ...],
                  parts: RotaryBertParts, types: int) -> EncoderConfig:
    """_built's EncoderConfig for NomicBERT and GTE, which have token types (`types` rows; 0: none)."""
    if not isinstance(types, int) or isinstance(types, bool) or types < 0:
        raise ModelFolderError(f"config.json's type_vocab_size={types!r} must be a whole number >= 0")
    built = _built(cls, cfg, model_type, max_positions, cfg.get("layer_norm_eps", 1e-12), activation, matryoshka,
                   rotary=parts)
    return dataclasses.replace(built, type_vocab_size=types)
