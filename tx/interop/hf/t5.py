"""T5 (``T5ForConditionalGeneration``): v1.0 (``relu``) and v1.1 (``gated-gelu``) feed-forwards.

T5 is a pre-norm encoder-decoder with RMSNorm without mean subtraction (tx ``rmsnorm``), no
biases, no absolute positions and unscaled attention logits (tx ``attention_scale=1.0``: the
``1/sqrt(H)`` is folded into the initialisation). Each stack's first layer owns a learned
relative position bias shared by all its layers (tx creates one ``T5RelativeBias`` per tower:
bidirectional buckets in the encoder, causal in the decoder); cross-attention has none. Source
and target share one embedding table. When the decoder output feeds the tied embeddings,
transformers multiplies it by ``d_model ** -0.5`` first (``scale_decoder_outputs``; tx
``head_scale``). transformers >= 5 always writes ``tie_word_embeddings=True`` for T5, so an
untied head shows only in the weights: a distinct ``lm_head.weight``.
"""

from __future__ import annotations

import numpy as np

from tx.config import ModelConfig
from tx.interop.hf.common import (Entry, attention, check_architecture, linear, one,
                                  unsupported)

ARCHITECTURES = {"t5": {"T5ForConditionalGeneration": "seq2seq"}}
_FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
                 "gated-silu": "swiglu", "gelu": "gelu_exact", "gelu_new": "gelu"}
_TO_HF = {"relu": "relu", "geglu": "gated-gelu", "swiglu": "gated-silu", "gelu_exact": "gelu",
          "gelu": "gelu_new"}
_BUCKETS, _MAX_DISTANCE = 32, 128  # tx's T5RelativeBias defaults, as in every T5 release
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "EncDecAttention.relative_attention_bias.weight")


def _scaled(hf: dict) -> bool:
    """Whether the decoder output is scaled by ``d_model ** -0.5`` before the head."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))


def fields(hf: dict, model_type: str) -> dict:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FEED_FORWARD:
        unsupported("feed_forward_proj", ff, f"tx maps {tuple(_FEED_FORWARD)}.")
    for option, value in (("relative_attention_num_buckets", _BUCKETS),
                          ("relative_attention_max_distance", _MAX_DISTANCE)):
        if hf.get(option, value) != value:
            unsupported(option, hf[option], f"tx's T5 bias uses {value}, as every T5 release.")
    if hf.get("is_decoder"):
        unsupported("is_decoder", True, "a T5ForConditionalGeneration config has "
                    "is_decoder=False; decoder-only T5 stacks are not mapped.")
    d, n = hf["d_model"], hf["num_heads"]
    layers = hf["num_layers"]
    decoder_layers = hf.get("num_decoder_layers") or layers
    return dict(family="encoder_decoder", task="seq2seq", vocab_size=hf["vocab_size"],
                d_model=d, num_layers=layers,
                num_decoder_layers=None if decoder_layers == layers else decoder_layers,
                num_heads=n, head_dim=None if hf["d_kv"] * n == d else hf["d_kv"],
                d_ff=hf["d_ff"], activation=_FEED_FORWARD[ff], norm="rmsnorm", pre_norm=True,
                positions="t5", max_len=hf.get("n_positions", 512), attention="full",
                tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), attention_scale=1.0,
                head_scale=d ** -0.5 if _scaled(hf) else 1.0)


def tensor_overrides(hf: dict, tensors: dict) -> dict:
    """Untied exactly when the checkpoint carries its own, different ``lm_head.weight``."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    untied = head is not None and (shared is None or not np.array_equal(head, shared))
    return {"tie_embeddings": not untied}


def model_type(cfg: ModelConfig) -> str | None:
    """``t5`` when ``cfg`` is a T5-shaped encoder-decoder, else None."""
    ok = (cfg.family == "encoder_decoder" and not cfg.layer_pattern and cfg.pre_norm and
          (cfg.norm, cfg.positions) == ("rmsnorm", "t5") and cfg.activation in _TO_HF and
          cfg.attention_scale == 1.0 and not (cfg.attention_bias or cfg.mlp_bias) and
          not (cfg.embed_norm or cfg.type_vocab_size or cfg.head_transform or cfg.head_bias)
          and cfg.kv_heads == cfg.num_heads and cfg.cross_attention is not False and
          cfg._split_attention()[1] in (None, "full"))
    return "t5" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    if cfg.head_scale not in (1.0, cfg.d_model ** -0.5):
        unsupported("head_scale", cfg.head_scale, "T5 scales the decoder output by "
                    "d_model ** -0.5 or not at all.")
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size,
                d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
                num_heads=cfg.num_heads, feed_forward_proj=_TO_HF[cfg.activation],
                relative_attention_num_buckets=_BUCKETS,
                relative_attention_max_distance=_MAX_DISTANCE, n_positions=cfg.max_len,
                layer_norm_epsilon=cfg.norm_eps, dropout_rate=0.0,
                tie_word_embeddings=cfg.tie_embeddings,
                scale_decoder_outputs=cfg.head_scale != 1.0, is_encoder_decoder=True,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _mlp(prefix: str, mlp) -> list[Entry]:
    if mlp.wi_up is None:
        return [linear(prefix + "wi.weight", mlp.wi_gate.kernel),
                linear(prefix + "wo.weight", mlp.wo.kernel)]
    return [linear(prefix + "wi_0.weight", mlp.wi_gate.kernel),  # through the activation
            linear(prefix + "wi_1.weight", mlp.wi_up.kernel),
            linear(prefix + "wo.weight", mlp.wo.kernel)]


def _stack(name: str, tower, cfg: ModelConfig) -> list[Entry]:
    n, h = cfg.num_heads, cfg.head_size
    qkvo = ("q", "k", "v", "o")
    out = [one(f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               tower.blocks[0].self_attn.bias.table),
           one(f"{name}.final_layer_norm.weight", tower.final_norm.scale)]
    for i, block in enumerate(tower.blocks):
        p = f"{name}.block.{i}.layer."
        out += attention(p + "0.SelfAttention.", block.self_attn, qkvo, n, n, h, bias=False)
        out.append(one(p + "0.layer_norm.weight", block.norms[0].scale))
        if block.cross_attn is not None:
            out += attention(p + "1.EncDecAttention.", block.cross_attn, qkvo, n, n, h,
                             bias=False)
            out.append(one(p + "1.layer_norm.weight", block.norms[1].scale))
        last = len(block.norms) - 1
        out += _mlp(f"{p}{last}.DenseReluDense.", block.mlp)
        out.append(one(f"{p}{last}.layer_norm.weight", block.norms[last].scale))
    return out


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    out = [one("shared.weight", model.encoder.embed.table_vd),
           *_stack("encoder", model.encoder.tower, cfg), *_stack("decoder", model.decoder, cfg)]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return _IGNORED + (("lm_head.weight",) if cfg.tie_embeddings else ())


def prepare(tensors: dict, model_type: str) -> dict:
    """Checkpoints that name the shared table only through the encoder's copy."""
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    return tensors
