"""Map Hugging Face BERT / RoBERTa / DistilBERT / MPNet safetensors onto PackedEncoder's parameters, Qwen2 / Qwen3
ones onto PackedDecoder's, Gemma3 ones onto PackedGemma's, ModernBERT ones onto PackedModernBert's, and NomicBERT and
GTE ones onto PackedRotaryBert's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.config import ClassifierHead, EncoderConfig, MaskedLMHead, ModelFolderError
from models.decoder import PackedDecoder
from models.encoder import ClassificationHead, PackedEncoder, ScoreHead, SpladeHead
from models.folder import ModelFolder
from models.gemma import PackedGemma
from models.modernbert import ModernBertClassificationHead, PackedModernBert
from models.rotary_bert import PackedRotaryBert

# a *For...'s base model: BERT's, RoBERTa's, ..., GTE's custom code's ("new."), transformers' GTE and NomicBERT's
_PREFIXES = ("bert.", "roberta.", "distilbert.", "mpnet.", "model.", "new.", "gte.", "nomic_bert.")
# torch's load_state_dict message for a weight of the wrong shape
_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from checkpoint, "
                       r"the shape in current model is torch.Size\((\[.*?\])\)")


def _bert_names(i: int) -> dict[str, list[str]]:
    p = f"encoder.layer.{i}."
    return {
        "qkv": [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"],
        "attn_out": [p + "attention.output.dense"],
        "attn_norm": [p + "attention.output.LayerNorm"],
        "ffn_in": [p + "intermediate.dense"],
        "ffn_out": [p + "output.dense"],
        "ffn_norm": [p + "output.LayerNorm"],
    }


def _distilbert_names(i: int) -> dict[str, list[str]]:
    p = f"transformer.layer.{i}."
    return {
        "qkv": [p + "attention.q_lin", p + "attention.k_lin", p + "attention.v_lin"],
        "attn_out": [p + "attention.out_lin"],
        "attn_norm": [p + "sa_layer_norm"],
        "ffn_in": [p + "ffn.lin1"],
        "ffn_out": [p + "ffn.lin2"],
        "ffn_norm": [p + "output_layer_norm"],
    }


def _mpnet_names(i: int) -> dict[str, list[str]]:
    """BERT's names but for attention's."""
    p = f"encoder.layer.{i}.attention."
    return {**_bert_names(i), "qkv": [p + "attn.q", p + "attn.k", p + "attn.v"], "attn_out": [p + "attn.o"],
            "attn_norm": [p + "LayerNorm"]}


_NAMES = {"distilbert": _distilbert_names, "mpnet": _mpnet_names}


def _strip_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, t in tensors.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = t
    return out


def reader(weight_files: list[Path]):
    """take(name): the tensor of that name (model prefix stripped) from the files; ModelFolderError if absent."""
    src: dict[str, torch.Tensor] = {}
    for f in weight_files:
        src.update(_strip_prefix(load_file(str(f))))
    return _taker(src, weight_files)


def _taker(src: dict[str, torch.Tensor], weight_files: list[Path]):
    """`reader`'s take over tensors already named without the model prefix."""
    def take(name: str) -> torch.Tensor:
        try:
            return src[name]
        except KeyError:
            raise ModelFolderError(f"weight {name!r} is missing from {', '.join(p.name for p in weight_files)}") from None
    return take


def load_head(head: ClassifierHead, cfg: EncoderConfig,
              take) -> ClassificationHead | ModernBertClassificationHead | ScoreHead:
    """The classification head of a *ForSequenceClassification folder (see ClassifierHead); take: `reader`'s."""
    if head.style == "score":  # a decoder's: score.weight [labels, hidden], no bias
        weight = _token_score(head.from_tokens, take) if head.from_tokens else take("score.weight")
        return _filled(lambda: ScoreHead(cfg.hidden_size, len(head.labels), head.pad_token_id), {"out.weight": weight})
    if head.style == "modernbert":
        parts = cfg.modernbert
        names = {"dense": ("head.dense", parts.classifier_bias), "norm": ("head.norm", parts.norm_bias),
                 "out": ("classifier", True)}
        state = {f"{ours}.{p}": take(f"{theirs}.{p}") for ours, (theirs, bias) in names.items()
                 for p in (("weight", "bias") if bias else ("weight",))}
        return _filled(lambda: ModernBertClassificationHead(cfg, len(head.labels)), state)
    dense, out = ("pooler.dense", "classifier") if head.style == "bert" else ("classifier.dense", "classifier.out_proj")
    return _filled(lambda: ClassificationHead(cfg.hidden_size, len(head.labels)),
                   {f"{ours}.{p}": take(f"{theirs}.{p}") for ours, theirs in (("dense", dense), ("out", out))
                    for p in ("weight", "bias")})


def _token_score(ids: tuple[int, ...], take) -> torch.Tensor:
    """model.classifier_from_token's score weight [1, hidden], as vLLM builds it: the LM head's row of the one token, or
    the second's less the first's (a logit difference: its sigmoid is the softmax over the two tokens' logits, the
    second's). The LM head is lm_head.weight [vocab, hidden], else (tie_word_embeddings: not saved) the token
    embeddings. In float32, whatever the files' dtype: the difference of two bfloat16 rows loses less."""
    try:
        lm_head = take("lm_head.weight")
    except ModelFolderError:
        lm_head = take("embed_tokens.weight")
    rows = lm_head[list(ids)].float()  # [len(ids), hidden]
    return (rows[1] - rows[0] if len(ids) == 2 else rows[0])[None]


def load_mlm_head(head: MaskedLMHead, cfg: EncoderConfig, take) -> SpladeHead:
    """The masked-LM head of a *ForMaskedLM folder for SPLADE pooling; the decoder is the word embeddings when
    the folder ties them (it then holds no decoder weight). take: `reader`'s."""
    if head.style == "bert":
        dense, norm, decoder, bias = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                      "cls.predictions.decoder.weight", "cls.predictions.bias")
    else:
        dense, norm, decoder, bias = "vocab_transform", "vocab_layer_norm", "vocab_projector.weight", "vocab_projector.bias"
    try:
        weight = take(decoder)
    except ModelFolderError:
        weight = take("embeddings.word_embeddings.weight")
    model = SpladeHead(cfg.hidden_size, cfg.vocab_size, cfg.activation, cfg.layer_norm_eps)
    state = {f"dense.{p}": take(f"{dense}.{p}") for p in ("weight", "bias")}
    state.update({f"norm.{p}": take(f"{norm}.{p}") for p in ("weight", "bias")})
    state.update({"decoder.weight": weight, "decoder.bias": take(bias)})
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def load_encoder(cfg: EncoderConfig, weight_files: list[Path], take=None,
                 dtype: torch.dtype = torch.float32) -> PackedEncoder | PackedDecoder | PackedGemma | PackedModernBert:
    """Build a PackedEncoder (a PackedDecoder for a decoder-only model, a PackedGemma for Gemma3, a PackedModernBert for
    ModernBERT) and fill it from safetensors files (or `take`, a `reader` of them already open), its parameters in
    `dtype`; every parameter must be found."""
    take = take or reader(weight_files)
    if cfg.model_type == "gemma3_text":
        return _filled(lambda: PackedGemma(cfg), _decoder_state(cfg, take), dtype)
    if cfg.decoder is not None:
        return _filled(lambda: PackedDecoder(cfg), _decoder_state(cfg, take), dtype)
    if cfg.modernbert is not None:
        return _filled(lambda: PackedModernBert(cfg), _modernbert_state(cfg, take), dtype)
    if cfg.rotary is not None:
        return _filled(lambda: PackedRotaryBert(cfg), _rotary_state(cfg, take), dtype)

    state: dict[str, torch.Tensor] = {
        "word_embeddings.weight": take("embeddings.word_embeddings.weight"),
        "position_embeddings.weight": take("embeddings.position_embeddings.weight"),
        "embed_norm.weight": take("embeddings.LayerNorm.weight"),
        "embed_norm.bias": take("embeddings.LayerNorm.bias"),
    }
    h = cfg.hidden_size
    state["token_type_embeddings.weight"] = (
        take("embeddings.token_type_embeddings.weight") if cfg.type_vocab_size > 0 else torch.zeros(1, h)
    )
    if cfg.relative_attention_buckets:  # MPNet: [buckets, heads], shared by every layer
        state["relative_attention_bias.weight"] = take("encoder.relative_attention_bias.weight")
    names_of = _NAMES.get(cfg.model_type, _bert_names)
    for i in range(cfg.num_layers):
        for ours, theirs in names_of(i).items():
            state[f"layers.{i}.{ours}.weight"] = torch.cat([take(n + ".weight") for n in theirs])
            state[f"layers.{i}.{ours}.bias"] = torch.cat([take(n + ".bias") for n in theirs])

    return _filled(lambda: PackedEncoder(cfg), state, dtype)


def _filled(make, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """make()'s model with `state`'s tensors, cast to `dtype`, as its parameters, in eval mode. The model is made on
    the meta device and takes the tensors themselves (no random initialisation to overwrite, no float32 model beside
    the files' tensors): a Qwen3-0.6B-shaped model's load_model took 4.8 s and 6.7 GB at its peak, now 1.7-2.5 s and
    4.4 GB (2-core VM)."""
    with torch.device("meta"):
        model = make()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# each layer's norms, ours -> the checkpoint's: Qwen's two, Gemma3's four
_DECODER_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}


def _decoder_state(cfg: EncoderConfig, take) -> dict[str, torch.Tensor]:
    """PackedDecoder's or PackedGemma's parameters from a Qwen2 / Qwen3 / Mistral / Llama / Gemma3 checkpoint's names
    (a *ForCausalLM's `model.` prefix stripped, its lm_head unread): q/k/v_proj into one qkv, gate/up_proj into one
    gate_up; biases only where config.json gives the layers them."""
    state = {"embed.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    parts = cfg.decoder
    norms = _GEMMA_NORMS if cfg.model_type == "gemma3_text" else _DECODER_NORMS
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        state.update({f"{ours}{mine}.weight": take(f"{theirs}{name}.weight") for mine, name in norms.items()})
        state[ours + "qkv.weight"] = torch.cat([take(f"{attn}{x}_proj.weight") for x in "qkv"])
        if parts.qkv_bias:
            state[ours + "qkv.bias"] = torch.cat([take(f"{attn}{x}_proj.bias") for x in "qkv"])
        if parts.qk_norm:
            state.update({f"{ours}{x}_norm.weight": take(f"{attn}{x}_norm.weight") for x in "qk"})
        state[ours + "attn_out.weight"] = take(attn + "o_proj.weight")
        if parts.out_bias:
            state[ours + "attn_out.bias"] = take(attn + "o_proj.bias")
        for p in ("weight", "bias") if parts.mlp_bias else ("weight",):  # Llama's mlp_bias: all three
            state[f"{ours}gate_up.{p}"] = torch.cat([take(f"{mlp}gate_proj.{p}"), take(f"{mlp}up_proj.{p}")])
            state[f"{ours}down.{p}"] = take(f"{mlp}down_proj.{p}")
    return state


def _modernbert_state(cfg: EncoderConfig, take) -> dict[str, torch.Tensor]:
    """PackedModernBert's parameters from a ModernBERT checkpoint's names (ModernBertModel's, or with a `model.` prefix
    stripped); biases only where config.json gives the layers them. Layer 0 has no attention norm."""
    parts = cfg.modernbert

    def params(bias: bool) -> tuple[str, ...]:
        return ("weight", "bias") if bias else ("weight",)

    norm = params(parts.norm_bias)
    names = {"embed": ("embeddings.tok_embeddings", ("weight",)), "embed_norm": ("embeddings.norm", norm),
             "final_norm": ("final_norm", norm)}
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"layers.{i}."
        if i:
            names[ours + "attn_norm"] = (theirs + "attn_norm", norm)
        names[ours + "qkv"] = (theirs + "attn.Wqkv", params(parts.attention_bias))
        names[ours + "attn_out"] = (theirs + "attn.Wo", params(parts.attention_bias))
        names[ours + "ffn_norm"] = (theirs + "mlp_norm", norm)
        names[ours + "ffn_in"] = (theirs + "mlp.Wi", params(parts.mlp_bias))
        names[ours + "ffn_out"] = (theirs + "mlp.Wo", params(parts.mlp_bias))
    return {f"{ours}.{p}": take(f"{theirs}.{p}") for ours, (theirs, kinds) in names.items() for p in kinds}


# NomicBERT's and GTE's names in the files, by layout: the custom code's (which transformers 5 saves too) and
# transformers 5's own; ours -> theirs, each layer's under its prefix, the q/k/v and up/gate parts concatenated
_ROTARY_LAYOUTS = {
    "nomic_bert": ("encoder.layers.{}.", {"embed_norm": "emb_ln"},
                   {"qkv": ["attn.Wqkv"], "attn_out": ["attn.out_proj"], "attn_norm": ["norm1"],
                    "up_gate": ["mlp.fc11", "mlp.fc12"], "down": ["mlp.fc2"], "ffn_norm": ["norm2"]}),
    "gte": ("encoder.layer.{}.", {},
            {"qkv": ["attention.qkv_proj"], "attn_out": ["attention.o_proj"], "attn_norm": ["attn_ln"],
             "up_gate": ["mlp.up_gate_proj"], "down": ["mlp.down_proj"], "ffn_norm": ["mlp_ln"]}),
    "transformers": ("layers.{}.", {},
                     {"qkv": [f"self_attn.{x}_proj" for x in "qkv"], "attn_out": ["self_attn.o_proj"],
                      "attn_norm": ["post_attention_layernorm"], "up_gate": ["mlp.up_proj", "mlp.gate_proj"],
                      "down": ["mlp.down_proj"], "ffn_norm": ["post_mlp_layernorm"]}),
}


def _rotary_state(cfg: EncoderConfig, take) -> dict[str, torch.Tensor]:
    """PackedRotaryBert's parameters from a NomicBERT or GTE checkpoint's names, in the custom code's layout or, where
    its first layer's are absent, transformers 5's; biases where config.json gives the layers them."""
    parts = cfg.rotary
    prefix, embed_names, layer_names = _ROTARY_LAYOUTS[cfg.model_type]
    try:
        take(prefix.format(0) + layer_names["qkv"][0] + ".weight")
    except ModelFolderError:
        prefix, embed_names, layer_names = _ROTARY_LAYOUTS["transformers"]
    state = {"embed.weight": take("embeddings.word_embeddings.weight")}
    if cfg.type_vocab_size:
        state["token_types.weight"] = take("embeddings.token_type_embeddings.weight")
    biased = {"qkv": parts.qkv_bias, "attn_out": parts.out_bias, "up_gate": False, "down": parts.down_bias}
    norm = embed_names.get("embed_norm", "embeddings.LayerNorm")
    state.update({f"embed_norm.{p}": take(f"{norm}.{p}") for p in ("weight", "bias")})
    for i in range(cfg.num_layers):
        theirs = prefix.format(i)
        for ours, names in layer_names.items():
            for p in ("weight", "bias") if biased.get(ours, True) else ("weight",):
                state[f"layers.{i}.{ours}.{p}"] = torch.cat([take(f"{theirs}{n}.{p}") for n in names])
    return state


def check_weights(folder: ModelFolder, pooling: str | None = None) -> None:
    """ModelFolderError unless the folder's files hold every weight the encoder and its head will load, each in the
    shape config.json implies. The loaders above run on the meta device over the headers' shapes (ModelFolder.shapes):
    the same names and shapes as a real load, no tensor data read. pooling: the model.pooling setting (SPLADE's
    masked-LM head is loaded only for it)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in _strip_prefix(folder.shapes).items()}
    take = _taker(meta, folder.weights)
    cfg = folder.encoder
    try:
        with torch.device("meta"):
            load_encoder(cfg, folder.weights, take)
            if folder.head is not None:
                load_head(folder.head, cfg, take)
            if folder.mlm is not None and (pooling or "splade") == "splade":
                load_mlm_head(folder.mlm, cfg, take)
    except RuntimeError as exc:  # load_state_dict's size mismatch (or torch.cat's): say the first, on one line
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        detail = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0])
        if found := _MISMATCH.match(detail):  # our parameter's name: layers.<i>.qkv is the query, key and value weights
            detail = f"{found[1]} is {found[2]} in the files, {found[3]} by config.json"
        raise ModelFolderError(f"the weights in {', '.join(p.name for p in folder.weights)} do not fit config.json "
                               f"(hidden_size {cfg.hidden_size}, {cfg.num_layers} layers): {detail}") from None
