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

from kernels import masks
from tx.config import ModelConfig
from tx.interop.hf.common import (Entry, activation_of, attention, check_architecture, linear,
                                  one, plain_body, uniform_mask, unsupported)
from tx.layers import RMSNorm, T5Bias
from tx.models.heads import Seq2SeqLM

ARCHITECTURES = {"t5": {"T5ForConditionalGeneration": "seq2seq"}}
_FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
                 "gated-silu": "swiglu", "gelu": "gelu_exact", "gelu_new": "gelu"}
_TO_HF = {"relu": "relu", "geglu": "gated-gelu", "swiglu": "gated-silu", "gelu_exact": "gelu",
          "gelu": "gelu_new"}
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
    if hf.get("is_decoder"):
        unsupported("is_decoder", True, "a T5ForConditionalGeneration config has "
                    "is_decoder=False; decoder-only T5 stacks are not mapped.")
    d, n = hf["d_model"], hf["num_heads"]
    layers = hf["num_layers"]
    decoder_layers = hf.get("num_decoder_layers") or layers
    return dict(task="seq2seq", vocab_size=hf["vocab_size"],
                d_model=d, num_layers=layers,
                num_decoder_layers=None if decoder_layers == layers else decoder_layers,
                num_heads=n, head_dim=None if hf["d_kv"] * n == d else hf["d_kv"],
                d_ff=hf["d_ff"], activation=_FEED_FORWARD[ff], norm="rmsnorm", pre_norm=True,
                positions="t5", max_len=hf.get("n_positions", 512),
                t5_buckets=int(hf.get("relative_attention_num_buckets", 32)),
                t5_max_distance=int(hf.get("relative_attention_max_distance", 128)),
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
    a, head = cfg.attention, cfg.head
    ok = (isinstance(head, Seq2SeqLM) and plain_body(cfg) and cfg.norm.pre and
          isinstance(cfg.norm, RMSNorm) and isinstance(cfg.positions, T5Bias) and
          activation_of(cfg) in _TO_HF and a.scale == 1.0 and not (a.bias or cfg.mlp.bias)
          and not head.bias and a.kv_heads == a.num_heads and
          uniform_mask(cfg) == masks.Full() and set(head.masks) <= {masks.Causal()})
    return "t5" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    head = cfg.head
    if head.scale not in (1.0, cfg.d_model ** -0.5):
        unsupported("head_scale", head.scale, "T5 scales the decoder output by "
                    "d_model ** -0.5 or not at all.")
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim,
                d_ff=cfg.mlp.d_ff, num_layers=cfg.num_layers,
                num_decoder_layers=head.num_layers or cfg.num_layers,
                num_heads=cfg.num_heads, feed_forward_proj=_TO_HF[activation_of(cfg)],
                relative_attention_num_buckets=cfg.positions.num_buckets,
                relative_attention_max_distance=cfg.positions.max_distance, n_positions=512,
                layer_norm_epsilon=cfg.norm.eps, dropout_rate=0.0,
                tie_word_embeddings=head.tie, scale_decoder_outputs=head.scale != 1.0,
                is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1)


def _mlp(prefix: str, mlp) -> list[Entry]:
    if mlp.wi_up is None:
        return [linear(prefix + "wi.weight", mlp.wi_gate.kernel),
                linear(prefix + "wo.weight", mlp.wo.kernel)]
    return [linear(prefix + "wi_0.weight", mlp.wi_gate.kernel),  # through the activation
            linear(prefix + "wi_1.weight", mlp.wi_up.kernel),
            linear(prefix + "wo.weight", mlp.wo.kernel)]


def _stack(name: str, tower, cfg: ModelConfig) -> list[Entry]:
    n, h = cfg.num_heads, cfg.head_dim
    qkvo = ("q", "k", "v", "o")
    out = [one(f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               tower.positions.table),
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
    if not cfg.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return _IGNORED + (("lm_head.weight",) if cfg.head.tie else ())


def prepare(tensors: dict, model_type: str) -> dict:
    """Checkpoints that name the shared table only through the encoder's copy."""
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    return tensors
