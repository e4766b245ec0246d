"""Heads as values: each builds its model, owns its loss and says what its batch needs.

The head is the config's answer to "what is this model for": ``LMHead`` (decoder-only LM),
``MLMHead``, ``Classifier`` and ``TokenClassifier`` (encoder-only), ``Seq2SeqLM``
(encoder-decoder). The model family follows from it. A new head is one file: a frozen
dataclass with ``build(config, *, rngs)`` and ``loss(model, batch)`` (see
``examples/extending/span_head.py``), registered for flags with ``tx.flags.register_head``.

Losses are fp32 means over weighted tokens; their metrics are sums and counts so they
aggregate exactly across steps and devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tx.config import cycle
from tx.registry import Field, Registry, optional, positive_float, positive_int
from tx.models import encoder as encoder_lib
from tx.models import funnel as funnel_lib
from tx.models.decoder import DecoderLM
from tx.models.encoder import MaskedLM, SequenceClassifier
from tx.models.outputs import ClsPooler, HeadTransform, MeanPooler, VocabHead
from tx.models.seq2seq import Seq2Seq


# -- losses shared by the heads -----------------------------------------------------------------
def argmax_is(logits, labels) -> jax.Array:
    """fp32 ``logits.argmax(-1) == labels`` (ties go to the first index, as argmax's do),
    without argmax: XLA's CPU backend runs that (value, index) reduction element by element,
    about 4x slower than this row max (shared with the softmax), gather and masked count."""
    labels = labels.astype(jnp.int32)
    top = jax.lax.stop_gradient(logits).max(-1, keepdims=True)
    at = jnp.take_along_axis(logits, labels[..., None], axis=-1, mode="clip")
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    earlier = (logits == top) & (index < labels[..., None])
    inside = (labels >= 0) & (labels < logits.shape[-1])  # argmax never equals the others
    return ((at == top)[..., 0] & ~earlier.any(-1) & inside).astype(jnp.float32)


def token_loss(logits_btv, targets_bt, weights_bt) -> tuple[jax.Array, dict]:
    """Weighted mean cross-entropy over tokens, with sum/count metrics."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    weights = weights_bt.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    correct = argmax_is(logits_btv, targets_bt)
    metrics = {"loss_sum": (ce * weights).sum(), "correct": (correct * weights).sum(),
               "count": weights.sum()}
    return (ce * weights).sum() / count, metrics


def class_loss(logits_bc, labels_b) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over examples, with sum/count metrics."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels_b)
    correct = argmax_is(logits_bc, labels_b)
    count = jnp.float32(labels_b.shape[0])
    return ce.mean(), {"loss_sum": ce.sum(), "correct": correct.sum(), "count": count}


def _packing(batch) -> dict:
    return {"segment_ids_bt": batch.get("segment_ids"), "positions_bt": batch.get("positions")}


def _encoder_token_loss(model, batch):
    """Per-token labels from a bidirectional encoder (masked LM, tagging)."""
    logits = model(batch["inputs"], lengths_b=batch.get("lengths"), **_packing(batch))
    return token_loss(logits, batch["targets"], batch["weights"])


def _check_classes(field: str, num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"head.{field}={num_classes!r}: a classifier needs an integer >= 2.")


# -- vocabulary heads ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _VocabLogits:
    """``[B, T, D] -> [B, T, V]`` through the embedding table when ``tie``; ``bias``,
    ``scale`` (on the hidden state) and ``softcap`` (``cap * tanh(logits / cap)`` on the
    logits, None: off) are there for imported checkpoints (BERT, T5, Gemma 2)."""

    tie: bool = True
    bias: bool = False
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"head.scale={self.scale!r}: must be > 0 (1.0 leaves the head "
                             "alone).")
        cap = self.softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or
                                not 0 < cap < float("inf")):
            raise ValueError(f"head.softcap={cap!r}: must be a finite float > 0 (Gemma 2: "
                             "30.0), or None for uncapped logits.")

    def output(self, cfg, embed, *, rngs: nnx.Rngs, transform=None) -> VocabHead:
        return VocabHead(embed, cfg.d_model, cfg.vocab_size, tied=self.tie, rngs=rngs,
                         transform=transform, use_bias=self.bias, scale=self.scale,
                         softcap=self.softcap)


@dataclasses.dataclass(frozen=True)
class LMHead(_VocabLogits):
    """Next-token prediction with a causal decoder (GPT, LLaMA, Mistral)."""

    causal = True
    generates = True
    batch_keys = ("inputs", "targets", "weights")

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        return DecoderLM(cfg, rngs=rngs)

    def loss(self, model, batch):
        logits = model(batch["inputs"], **_packing(batch))
        return token_loss(logits, batch["targets"], batch["weights"])


@dataclasses.dataclass(frozen=True)
class MLMHead(_VocabLogits):
    """Masked-token prediction with a bidirectional encoder (BERT); ``transform`` adds BERT's
    dense + activation + norm before the vocabulary projection; ``body`` (None: the config's
    tower) builds another encoder body, e.g. ``tx.models.funnel.Funnel``."""

    transform: bool = False
    body: object = None
    causal = False
    generates = False
    batch_keys = ("inputs", "targets", "weights")

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        if self.body is not None:
            return self.body.build_mlm(cfg, self, rngs=rngs)
        return MaskedLM(cfg, rngs=rngs)

    def output(self, cfg, embed, *, rngs: nnx.Rngs, transform=None) -> VocabHead:
        if self.transform:
            transform = HeadTransform(cfg.d_model, cfg.mlp.activation, cfg.norm, rngs=rngs)
        return super().output(cfg, embed, rngs=rngs, transform=transform)

    def loss(self, model, batch):
        return _encoder_token_loss(model, batch)


@dataclasses.dataclass(frozen=True)
class Seq2SeqLM(_VocabLogits):
    """An encoder-decoder (original Transformer, T5): the encoder is the config's tower, the
    decoder has ``num_layers`` causal blocks (None: as many as the encoder) with their own
    mask schedule (empty: ``Causal()``), cross-attending to the encoder output."""

    num_layers: int | None = None
    masks: tuple = ()
    causal = False  # the encoder's self-attention; the decoder is causal by construction
    generates = True
    batch_keys = ("source", "inputs", "targets", "weights")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "masks", tuple(self.masks))
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or
                                            self.num_layers < 1):
            raise ValueError(f"head.num_layers={self.num_layers!r}: a positive integer, or "
                             "None for as many decoder layers as encoder layers.")

    def decoder_layer_masks(self, cfg, default) -> tuple:
        return cycle(self.masks, self.num_layers or cfg.num_layers, default)

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        return Seq2Seq(cfg, rngs=rngs)

    def loss(self, model, batch):
        logits = model(batch["source"], batch["inputs"],
                       source_lengths_b=batch.get("source_lengths"))
        return token_loss(logits, batch["targets"], batch["weights"])


# -- classifiers --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeanPool:
    """A sequence's mean hidden state over its valid tokens."""

    def build(self, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
        return MeanPooler()


@dataclasses.dataclass(frozen=True)
class ClsPool:
    """BERT's pooler: ``tanh(dense(h))`` of the first ([CLS]) token."""

    def build(self, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
        return ClsPooler(d_model, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """One label per sequence from a pooled encoder output."""

    num_classes: int = 2
    pooler: object = MeanPool()
    bias: bool = False
    causal = False
    generates = False
    batch_keys = ("inputs", "labels")

    def __post_init__(self):
        _check_classes("num_classes", self.num_classes)
        if not callable(getattr(self.pooler, "build", None)):
            raise ValueError(f"head.pooler={self.pooler!r}: give MeanPool() or ClsPool().")

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        return SequenceClassifier(cfg, rngs=rngs)

    def loss(self, model, batch):
        return class_loss(model(batch["inputs"], lengths_b=batch.get("lengths")),
                          batch["labels"])


@dataclasses.dataclass(frozen=True)
class TokenClassifier:
    """One label per token (tagging) from the encoder output."""

    num_classes: int = 2
    bias: bool = False
    causal = False
    generates = False
    batch_keys = ("inputs", "targets", "weights")

    def __post_init__(self):
        _check_classes("num_classes", self.num_classes)

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        return encoder_lib.TokenClassifier(cfg, rngs=rngs)

    def loss(self, model, batch):
        return _encoder_token_loss(model, batch)



# -- flag names (tx.flags): the `task` flag picks a head; each declares the fields it reads -----
POOLERS = Registry("pooler", "pooler")
POOLERS.register("mean", MeanPool())
POOLERS.register("cls", ClsPool())

_HEAD_BIAS = Field("head_bias", False, "output biases on the vocab and class heads (BERT)")
_CLASSES = Field("num_classes", 2, "labels of a classification head", check=positive_int)
_VOCAB = (Field("tie_embeddings", True, "the vocab head reuses the embedding table"),
          _HEAD_BIAS,
          Field("head_scale", 1.0, "multiplies the last hidden state before the vocab head "
                "(T5)", check=positive_float),
          Field("final_softcap", None, "cap * tanh(logits / cap) on the vocab logits (Gemma 2: "
                "30.0); None: off", type=float, check=optional(positive_float)))
TASKS = Registry("task", "task", register_hint="tx.flags.register_head(task, fn, fields=...)",
                 fields=_VOCAB, check=funnel_lib.check_flags)


def _vocab(f) -> dict:
    return dict(tie=f.tie_embeddings, bias=f.head_bias, scale=f.head_scale,
                softcap=f.final_softcap)


def _vocab_fields(v) -> dict:
    return dict(tie_embeddings=v.tie, head_bias=v.bias, head_scale=v.scale,
                final_softcap=v.softcap)


def _seq2seq_fields(v) -> dict | None:
    # The decoder's masks are the encoder's schedule made causal: tx.flags checks that the
    # printed flags rebuild the whole config, masks included.
    return type(v) is Seq2SeqLM and dict(_vocab_fields(v), num_decoder_layers=v.num_layers)


TASKS.register("lm", lambda f: LMHead(**_vocab(f)),
               prints=lambda v: type(v) is LMHead and _vocab_fields(v))
TASKS.register("mlm", lambda f: MLMHead(**_vocab(f), transform=f.head_transform,
                                        body=funnel_lib.from_flags(f)),
               fields=(Field("head_transform", False, "dense + activation + norm before the "
                             "vocab head (BERT MLM)"), *funnel_lib.FIELDS),
               prints=lambda v: type(v) is MLMHead and funnel_lib.to_fields(v.body) is not None
               and dict(_vocab_fields(v), head_transform=v.transform,
                        **funnel_lib.to_fields(v.body)))
TASKS.register("seq_cls", lambda f: Classifier(f.num_classes, POOLERS[f.pooler], f.head_bias),
               fields=(_CLASSES, Field("pooler", "mean", "seq_cls: mean over valid tokens, or "
                                       "'cls' = tanh(dense(first)) (BERT)",
                                       check=lambda n, v: None if v in POOLERS else
                                       f"use one of {POOLERS.names()}.")),
               prints=lambda v: type(v) is Classifier and dict(
                   num_classes=v.num_classes, pooler=POOLERS.name_of(v.pooler),
                   head_bias=v.bias))
TASKS.register("token_cls", lambda f: TokenClassifier(f.num_classes, f.head_bias),
               fields=(_CLASSES,), prints=lambda v: type(v) is TokenClassifier and dict(
                   num_classes=v.num_classes, head_bias=v.bias))
TASKS.register("seq2seq", lambda f: Seq2SeqLM(**_vocab(f), num_layers=f.num_decoder_layers,
                                              masks=f.layer_masks(causal=True)),
               fields=(Field("num_decoder_layers", None, "seq2seq decoder layers; None: "
                             "num_layers", type=int, check=optional(positive_int)),),
               prints=_seq2seq_fields)
