"""Model configuration: a small tree of frozen dataclasses whose leaves are the variants.

A ``ModelConfig`` holds values, not names (a variant is a value, not a string to look up):

* ``attention``: an :class:`AttentionConfig` (the heads axis ``num_kv_heads``, the pattern axis
  as one ``Mask`` per layer or a short schedule cycled over the layers, the implementation axis
  as registry names or callables);
* ``positions``: a value such as ``RoPE(base)``, ``T5Buckets(num_buckets, max_distance)``,
  ``ALiBiSlopes()`` (``tx.layers.positions``) that builds the tower's position module;
* ``mlp`` and ``norm``: ``tx.layers.MLPConfig``, ``tx.layers.RMSNorm`` / ``LayerNorm``;
* ``head``: ``LMHead``, ``MLMHead``, ``Classifier``, ``TokenClassifier``, ``Seq2SeqLM``
  (``tx.models.heads``); the head builds the model, owns its loss and says what its batch
  needs, so the model family follows from it.

This module is a leaf of the import graph: it imports nothing from ``kernels`` or ``tx`` but the
stdlib-only ``tx.registry``; the
leaves are checked by what they can do (``build``, ``predicate``...), so a research file can
bring its own. Names and flag spellings live in one place, ``tx.flags``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from tx.registry import Registry


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field}={value!r}: {fix}")


def _positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "must be a positive integer.")


def _needs(field: str, value: Any, *methods: str, what: str) -> None:
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if missing:
        _fail(field, value, f"give {what} (a value with {', '.join(methods)}).")


def _is_mask(value: Any) -> bool:
    return all(callable(getattr(value, m, None)) for m in ("predicate", "dense", "tile_map"))


def _is_layer(value: Any) -> bool:
    """A schedule entry: a mask (softmax attention), or a value that builds its own attention
    layer (``build_attention``, e.g. ``tx.attention.favor.Favor``)."""
    return _is_mask(value) or callable(getattr(value, "build_attention", None))


def cycle(schedule: tuple, num_layers: int, default) -> tuple:
    """``schedule`` repeated over ``num_layers`` layers (``default`` everywhere when empty)."""
    schedule = schedule or (default,)
    return tuple(schedule[i % len(schedule)] for i in range(num_layers))


# A config that names no implementation runs the device's order
# (tx.attention.registry.defaults: Pallas first on a GPU, the fused cpu kernel on a CPU).
DEFAULT_IMPLEMENTATION = ()
# The activation dtypes a config may name (``--config.model.dtype``).
DTYPES = Registry("dtype", "dtype")
for _name, _dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16),
                      ("float16", jnp.float16)):
    DTYPES.register(_name, _dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """The three axes of self-attention, plus the projections' options.

    ``masks`` is one mask per layer, or a shorter schedule cycled over the layers; empty means
    every key (``Full`` in an encoder, ``Causal`` in a decoder: the head decides).
    ``implementation`` is an ordered tuple of registered backend names
    (``tx.attention.registry``), backends or functions; empty: the device's order.
    """

    num_heads: int
    num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // num_heads
    masks: tuple = ()
    implementation: tuple = DEFAULT_IMPLEMENTATION
    scale: float | None = None  # logits scale; None: head_dim ** -0.5 (T5: 1.0)
    bias: bool = False  # biases on the q/k/v/o projections (GPT-2, BERT)
    out_bias: bool | None = None  # bias on the output projection; None: as ``bias`` (Qwen2: False)
    # A ``kernels.score_mods`` value applied to every layer's logits (e.g. ``SoftCap(50.0)``,
    # Gemma 2), composed after the position scheme's own (T5 buckets, ALiBi).
    score_mod: Any = None
    sinks: bool = False  # a learned per-head sink logit in every layer (takes mass, no value)
    # Per-head q/k norms: q and k each pass through the model's norm (``ModelConfig.norm``)
    # over head_dim, after the projections and before RoPE (Qwen3, Gemma 3, OLMo 2-style).
    qk_norm: bool = False

    def __post_init__(self):
        if not isinstance(self.masks, tuple):
            object.__setattr__(self, "masks", tuple(self.masks) if isinstance(
                self.masks, (list, tuple)) else (self.masks,))
        if isinstance(self.implementation, (str,)) or callable(self.implementation):
            object.__setattr__(self, "implementation", (self.implementation,))
        elif not isinstance(self.implementation, tuple):
            object.__setattr__(self, "implementation", tuple(self.implementation))
        _positive_int("attention.num_heads", self.num_heads)
        kv = self.kv_heads
        _positive_int("attention.num_kv_heads", kv)
        if kv > self.num_heads or self.num_heads % kv:
            _fail("attention.num_kv_heads", kv, f"must divide num_heads={self.num_heads}; pick "
                  "a divisor of num_heads (1: MQA, num_heads: MHA).")
        if self.head_dim is not None:
            _positive_int("attention.head_dim", self.head_dim)
        for mask in self.masks:
            if not _is_layer(mask):
                _fail("attention.masks", self.masks, f"{mask!r} is not a mask; give "
                      "kernels.masks values (Causal(), Local(63), ...) or layer values "
                      "(tx.attention.favor.Favor(...)).")
        for impl in self.implementation:
            if not (isinstance(impl, str) or callable(impl)):
                _fail("attention.implementation", self.implementation, f"{impl!r} is neither a "
                      "registry name nor a callable.")
        if self.scale is not None and not self.scale > 0:
            _fail("attention.scale", self.scale, "must be > 0, or None for head_dim ** -0.5.")
        if not isinstance(self.qk_norm, bool):
            _fail("attention.qk_norm", self.qk_norm, "must be True (per-head q/k norms) or "
                  "False.")
        if self.score_mod is not None and not callable(getattr(self.score_mod, "modify", None)):
            _fail("attention.score_mod", self.score_mod, "give a kernels.score_mods value "
                  "(SoftCap(50.0), ALiBi(slopes), ScoreFn(fn), ...) or None.")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def layer_masks(self, num_layers: int, default) -> tuple:
        """One mask per layer: the schedule cycled, or ``default`` everywhere."""
        return cycle(self.masks, num_layers, default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Input embedding options of imported checkpoints (BERT, Gemma); the defaults change
    nothing."""

    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input; BERT: 2
    norm: bool = False  # a norm right after the summed input embeddings (BERT)
    # Multiplies the looked-up token vectors, rounded to the compute dtype first as Gemma
    # does (Gemma: sqrt(d_model)); the tied output projection uses the unscaled table.
    scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) \
                or self.type_vocab_size < 0:
            _fail("embed.type_vocab_size", self.type_vocab_size, "must be an integer >= 0 (0: "
                  "no token-type embeddings).")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or \
                not 0 < self.scale < float("inf"):
            _fail("embed.scale", self.scale, "must be a finite float > 0 (1.0: unscaled; "
                  "Gemma: d_model ** 0.5).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything needed to build a tx model: ``config.head.build(config, rngs=...)``, or
    ``tx.models.build(config)``."""

    vocab_size: int
    d_model: int
    num_layers: int
    attention: AttentionConfig
    positions: Any  # builds the tower's position module: tx.layers.positions
    mlp: Any  # builds the MLP: tx.layers.MLPConfig
    norm: Any  # builds every norm: tx.layers.RMSNorm / LayerNorm
    head: Any  # builds the model and owns its loss: tx.models.heads
    embed: EmbedConfig = EmbedConfig()
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # activations; parameters and softmax stay fp32
    # Transformer-XL recurrence: every self-attention layer also sees the last
    # ``memory_length`` hidden states of the previous segments (tx.attention.memory); 0: off.
    memory_length: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.attention, AttentionConfig):
            _fail("attention", self.attention, "give a tx.config.AttentionConfig.")
        if self.attention.head_dim is None and self.d_model % self.attention.num_heads:
            _fail("d_model", self.d_model, f"must be divisible by attention.num_heads="
                  f"{self.attention.num_heads} when head_dim is implicit; set head_dim or "
                  "change num_heads.")
        _needs("positions", self.positions, "build", what="a positions value (RoPE(), "
               "Learned(max_len), T5Buckets(), ALiBiSlopes(), NoPositions()...)")
        _needs("mlp", self.mlp, "build", what="an MLP value (tx.layers.MLPConfig)")
        _needs("norm", self.norm, "build", what="a norm value (tx.layers.RMSNorm())")
        _needs("head", self.head, "build", "loss", what="a head value (LMHead(), "
               "Classifier(num_classes)...)")
        if not isinstance(self.embed, EmbedConfig):
            _fail("embed", self.embed, "give a tx.config.EmbedConfig.")
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail("dropout_rate", self.dropout_rate, "must be in [0, 1).")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                         jnp.dtype(jnp.float16)):
            _fail("dtype", self.dtype, "use jnp.float32, jnp.bfloat16 or jnp.float16.")
        self._check_memory()
        self._check_schedules()
        for i, layer in enumerate(self.attention.masks):  # layer values refuse what they cannot be
            check = getattr(layer, "check_config", None)
            if callable(check):
                check(self, i)

    def _check_schedules(self) -> None:
        """A schedule longer than its tower would be cut, training fewer patterns than it
        names: refused (a shorter one is cycled over the layers)."""
        towers = [("attention.masks", self.attention.masks, self.num_layers, "num_layers")]
        if getattr(self.head, "masks", None):  # a seq2seq decoder's own schedule
            towers.append(("head.masks", self.head.masks,
                           getattr(self.head, "num_layers", None) or self.num_layers,
                           "num_decoder_layers"))
        for field, schedule, layers, count in towers:
            if len(schedule) > layers:
                _fail(f"{field} (layer_pattern)", schedule, f"names {len(schedule)} layers "
                      f"but the tower has {layers}; the last {len(schedule) - layers} would "
                      f"never be built. Give at most {layers} (a shorter schedule is cycled "
                      f"over the layers) or raise {count}.")

    def _check_memory(self) -> None:
        m = self.memory_length
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            _fail("memory_length", m, "must be an integer >= 0 (0: no memory).")
        if m and getattr(self.positions, "absolute", False):
            _fail("memory_length", m, f"positions={self.positions!r} embeds absolute "
                  "positions, which a memory of earlier segments would repeat; use relative "
                  "positions (xl, rope, alibi, t5 or none) or memory_length=0.")
        if m and not getattr(self.head, "causal", False):
            _fail("memory_length", m, f"head={type(self.head).__name__} is not causal; a "
                  "memory carries a decoder LM's earlier segments (task=lm).")

    @property
    def head_dim(self) -> int:
        a = self.attention
        return a.head_dim if a.head_dim is not None else self.d_model // a.num_heads

    @property
    def kv_heads(self) -> int:
        return self.attention.kv_heads

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads


def replace(config, **changes):
    """A validated copy of any config value with some fields changed."""
    return dataclasses.replace(config, **changes)

