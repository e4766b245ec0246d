"""Model configuration: a frozen dataclass validated at construction.

The attention variant is three independent axes (see DESIGN.md):

* heads: ``num_kv_heads`` (MHA = ``num_heads``, GQA in between, MQA = 1);
* pattern: a mask per layer, named by ``attention`` / ``layer_pattern``;
* implementation: an ordered tuple of registry names, e.g. ``("pallas", "xla")``.

``attention`` is a convenience string that sets the heads axis, the pattern axis or both:
``"gqa"``, ``"local"``, ``"gqa+local"``. An explicit ``num_kv_heads`` always wins over the
preset. Every error names the field, its value and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kernels import masks
from tx.layers.rope_scaling import RopeScaling

FAMILIES = ("decoder", "encoder", "encoder_decoder")
TASKS = {"decoder": ("lm",), "encoder": ("mlm", "seq_cls", "token_cls"),
         "encoder_decoder": ("seq2seq",)}
HEAD_PRESETS = ("mha", "gqa", "mqa")
PATTERN_PRESETS = ("full", "causal", "local", "sparse", "strided", "bigbird", "global")
POSITIONS = ("rope", "sinusoidal", "learned", "t5", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "swiglu", "geglu")
POOLERS = ("mean", "cls")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field}={value!r}: {fix}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a tx model; see ``tx.models.build``."""

    family: str = "decoder"
    task: str = "lm"
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_decoder_layers: int | None = None  # encoder-decoder only; None means num_layers
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: from the `attention` preset (MHA by default)
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 256
    activation: str = "gelu"
    norm: str = "rmsnorm"
    pre_norm: bool = True
    positions: str = "rope"
    max_len: int = 512
    dropout_rate: float = 0.0
    tie_embeddings: bool = True
    attention: str = "mha"
    layer_pattern: tuple[str, ...] = ()  # per-layer pattern names, cycled over the layers
    window: int = 64
    stride: int = 8
    sparse_block: int = 16
    num_classes: int = 2
    cross_attention: bool | None = None  # None: exactly when the family has a decoder on an encoder
    implementation: tuple[str, ...] = ("xla",)
    dtype: str = "float32"
    norm_eps: float = 1e-6  # epsilon of every LayerNorm / RMSNorm
    rope_base: float = 10000.0  # RoPE's theta: the angle of dimension pair i is p * base^(-2i/H)
    attention_bias: bool = False  # biases on the q/k/v/o projections (GPT-2, BERT)
    mlp_bias: bool = False  # biases on the MLP projections (GPT-2, BERT)
    rope_scaling: RopeScaling | None = None  # long-context RoPE frequencies (linear, yarn...)
    attention_scale: float | None = None  # logits scale; None: head_dim ** -0.5 (T5: 1.0)
    # Hooks for imported architectures (BERT, T5); the defaults change nothing.
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input; BERT: 2
    embed_norm: bool = False  # a norm right after the summed input embeddings (BERT)
    head_transform: bool = False  # dense + activation + norm before the vocab head (BERT MLM)
    head_bias: bool = False  # output biases on the vocab and class heads (BERT)
    head_scale: float = 1.0  # multiplies the last hidden state before the vocab head (T5)
    pooler: str = "mean"  # seq_cls: mean over valid tokens, or 'cls' = tanh(dense(first)) (BERT)

    def __post_init__(self):
        if isinstance(self.implementation, str):
            object.__setattr__(self, "implementation", tuple(self.implementation.split(",")))
        if isinstance(self.layer_pattern, str):
            names = tuple(p for p in self.layer_pattern.split(",") if p)
            object.__setattr__(self, "layer_pattern", names)
        self._validate()

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.family not in FAMILIES:
            _fail("family", self.family, f"use one of {FAMILIES}.")
        if self.task not in TASKS[self.family]:
            _fail("task", self.task, f"a {self.family} model supports {TASKS[self.family]}.")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
                     "num_classes", "stride", "sparse_block"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be a positive integer.")
        if self.window <= 0:
            _fail("window", self.window, "a local window must hold at least one key; use >= 1.")
        if self.head_dim is None and self.d_model % self.num_heads:
            _fail("d_model", self.d_model, f"must be divisible by num_heads={self.num_heads} "
                  "when head_dim is implicit; set head_dim or change num_heads.")
        if self.head_dim is not None and self.head_dim < 1:
            _fail("head_dim", self.head_dim, "must be a positive integer.")
        heads, patterns = self._split_attention()
        kv = self.kv_heads
        if kv < 1 or kv > self.num_heads:
            _fail("num_kv_heads", kv, f"must be between 1 and num_heads={self.num_heads}.")
        if self.num_heads % kv:
            _fail("num_kv_heads", kv, f"num_heads={self.num_heads} must be divisible by "
                  "num_kv_heads; pick a divisor of num_heads.")
        if heads == "gqa" and not 1 < kv < self.num_heads:
            _fail("num_kv_heads", kv, f"attention='gqa' needs 1 < num_kv_heads < "
                  f"num_heads={self.num_heads}; use 'mqa' or 'mha' for the ends.")
        for name in self.layer_pattern:
            if name not in PATTERN_PRESETS:
                _fail("layer_pattern", self.layer_pattern, f"{name!r} is not one of "
                      f"{PATTERN_PRESETS}.")
        for value, field, allowed in ((self.positions, "positions", POSITIONS),
                                      (self.norm, "norm", NORMS),
                                      (self.activation, "activation", ACTIVATIONS),
                                      (self.dtype, "dtype", tuple(DTYPES))):
            if value not in allowed:
                _fail(field, value, f"use one of {allowed}.")
        for name in self.implementation:
            if name not in IMPLEMENTATIONS:
                _fail("implementation", self.implementation, f"{name!r} is not one of "
                      f"{IMPLEMENTATIONS}; give an ordered tuple such as ('pallas', 'xla').")
        if self.cross_attention and self.family != "encoder_decoder":
            _fail("cross_attention", self.cross_attention, f"a {self.family} model has no "
                  "encoder to attend to; use family='encoder_decoder'.")
        if self.positions == "learned" and self.max_len < 1:
            _fail("max_len", self.max_len, "learned positions need max_len >= 1.")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be a positive float, e.g. 1e-6.")
        if not self.rope_base > 1:
            _fail("rope_base", self.rope_base, "must be > 1, e.g. 10000.0.")
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail("dropout_rate", self.dropout_rate, "must be in [0, 1).")
        self._validate_hooks()

    def _validate_hooks(self) -> None:
        if self.rope_scaling is not None and (self.positions != "rope" or
                                              not isinstance(self.rope_scaling, RopeScaling)):
            _fail("rope_scaling", self.rope_scaling, "give a tx.layers.RopeScaling, with "
                  "positions='rope'.")
        if self.attention_scale is not None and not self.attention_scale > 0:
            _fail("attention_scale", self.attention_scale, "must be > 0, or None for "
                  "head_dim ** -0.5.")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            _fail("type_vocab_size", self.type_vocab_size, "must be an integer >= 0 (0: no "
                  "token-type embeddings).")
        if not self.head_scale > 0:
            _fail("head_scale", self.head_scale, "must be > 0 (1.0 leaves the head alone).")
        if self.pooler not in POOLERS:
            _fail("pooler", self.pooler, f"use one of {POOLERS}.")

    def _split_attention(self) -> tuple[str, str | None]:
        """Parses ``attention`` into (heads preset, pattern preset or None)."""
        heads, pattern = "mha", None
        for part in self.attention.split("+"):
            if part in HEAD_PRESETS:
                heads = part
            elif part in PATTERN_PRESETS:
                pattern = part
            else:
                _fail("attention", self.attention, f"{part!r} is not a variant; use one of "
                      f"{HEAD_PRESETS + PATTERN_PRESETS}, or join a heads and a pattern "
                      "preset with '+', e.g. 'gqa+local'.")
        return heads, pattern

    # -- derived values -----------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        heads, _ = self._split_attention()
        return {"mha": self.num_heads, "mqa": 1, "gqa": max(1, self.num_heads // 2)}[heads]

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def pattern_mask(self, name: str | None, *, causal: bool) -> masks.Mask:
        """The mask of one named pattern; ``causal`` for decoder self-attention."""
        w, s = self.window, self.stride
        if name in (None, "full", "causal"):
            return masks.Causal() if causal else masks.Full()
        if name == "local":  # a window of `window` keys: Mistral's Local(W - 1) when causal
            return masks.Local(w - 1) if causal else masks.Local(w // 2, w // 2)
        if name == "strided" or (name == "sparse" and causal):
            return masks.Strided(s)  # Sparse Transformer's (causal) strided pattern
        if name in ("sparse", "bigbird"):  # bidirectional sparse is BigBird
            bb = masks.BigBird(self.sparse_block, window_blocks=3, global_blocks=1,
                               random_blocks=1)
            return bb & masks.Causal() if causal else bb
        if name == "global":
            glob = masks.Local(w - 1) | masks.GlobalTokens((0,)) if causal else \
                masks.Local(w // 2, w // 2) | masks.GlobalTokens((0,))
            return glob & masks.Causal() if causal else glob
        raise ValueError(f"pattern={name!r} is not one of {PATTERN_PRESETS}.")

    def layer_masks(self, num_layers: int, *, causal: bool) -> tuple[masks.Mask, ...]:
        """One mask per layer: ``layer_pattern`` cycled, else the ``attention`` preset's."""
        _, pattern = self._split_attention()
        names = self.layer_pattern or (pattern,)
        return tuple(self.pattern_mask(names[i % len(names)], causal=causal)
                     for i in range(num_layers))


def replace(config: ModelConfig, **changes) -> ModelConfig:
    """A validated copy with some fields changed."""
    return dataclasses.replace(config, **changes)
