"""The flag edge: the one place where names become values.

Researchers write ``--config.model.attention=gqa+local``, ``positions=t5``,
``layer_pattern=local,local,local,full``, ``window=128``; the ml_collections configs hold these
flat fields (:class:`ModelFlags`). :func:`parse` turns them into a :class:`tx.config.ModelConfig`
whose leaves are values (masks, ``RoPE(...)``, ``LMHead(...)``...). Nothing below this module
reads a name again.

Named presets live in registries that research code extends from its own file; a registered
name then works from flags with no other edit:

* ``register_pattern(name, fn)``: ``fn(flags, causal=...) -> Mask`` (used in ``attention``
  and ``layer_pattern``);
* ``register_positions(name, fn)``: ``fn(flags) -> positions value``;
* ``register_head(task, fn)``: ``fn(flags) -> head value`` (the ``task`` flag);
* implementations: ``tx.attention.register(name, fn)``, the single source of their names.

Every error names the flag, its value and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels import masks, score_mods
from tx.attention import favor, quant, registry
from tx.config import DEFAULT_IMPLEMENTATION, AttentionConfig, EmbedConfig, ModelConfig
from tx.inference import generation
from tx.layers import mlp as mlp_lib
from tx.layers import norms, positions
from tx.layers.rope_scaling import RopeScaling
from tx.models import heads


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field}={value!r}: {fix}")


# -- registries ---------------------------------------------------------------------------------
PatternFn = Callable[..., masks.Mask]
_PATTERNS: dict[str, PatternFn] = {}
_POSITIONS: dict[str, Callable[["ModelFlags"], Any]] = {}
_HEADS: dict[str, Callable[["ModelFlags"], Any]] = {}
HEAD_PRESETS = {"mha": lambda n: n, "mqa": lambda n: 1, "gqa": lambda n: max(1, n // 2)}


def _register(table: dict, kind: str, name: str, fn: Callable) -> None:
    if not isinstance(name, str) or not name or "+" in name or "," in name:
        _fail(f"{kind} name", name, "use a non-empty name without '+' or ','.")
    if not callable(fn):
        _fail(f"{kind} {name!r}", fn, "give a function that builds the value.")
    table[name] = fn


def register_pattern(name: str, fn: PatternFn) -> None:
    """``fn(flags, *, causal) -> Mask``; ``causal`` is True in a decoder's self-attention.
    ``flags`` is the :class:`ModelFlags` (``window``, ``stride``, ``sparse_block``...)."""
    _register(_PATTERNS, "pattern", name, fn)


def register_positions(name: str, fn: Callable) -> None:
    """``fn(flags) -> positions value`` (a value with ``build(cfg, *, causal, rngs)``)."""
    _register(_POSITIONS, "positions", name, fn)


def register_head(task: str, fn: Callable) -> None:
    """``fn(flags) -> head value`` (a value with ``build`` and ``loss``), selected by the
    ``task`` flag; a dataset of the same task name feeds it."""
    _register(_HEADS, "task", task, fn)


def patterns() -> tuple[str, ...]:
    return tuple(_PATTERNS)


def position_schemes() -> tuple[str, ...]:
    return tuple(_POSITIONS)


def tasks() -> tuple[str, ...]:
    return tuple(_HEADS)


def _window(f: "ModelFlags", causal: bool) -> masks.Mask:
    # A window of `window` keys: Mistral's Local(W - 1) when causal, centred otherwise.
    w = f.window
    return masks.Local(w - 1) if causal else masks.Local(w // 2, w // 2)


def _bigbird(f: "ModelFlags", causal: bool) -> masks.Mask:
    bb = masks.BigBird(f.sparse_block, window_blocks=3, global_blocks=1, random_blocks=1)
    return bb & masks.Causal() if causal else bb


def _global(f: "ModelFlags", causal: bool) -> masks.Mask:
    glob = _window(f, causal) | masks.GlobalTokens((0,))
    return glob & masks.Causal() if causal else glob


def _everything(f: "ModelFlags", causal: bool) -> masks.Mask:
    return masks.Causal() if causal else masks.Full()


def _favor(f: "ModelFlags", causal: bool) -> favor.Favor:
    return favor.Favor(f.linear_features, causal=causal, chunk=f.linear_chunk,
                       redraw_every=f.linear_redraw)


def _local_global(f: "ModelFlags", causal: bool) -> favor.LocalGlobal:
    return favor.LocalGlobal(_window(f, causal), _favor(f, causal))


for _name, _fn in (
        ("full", _everything), ("causal", _everything), ("local", _window),
        ("strided", lambda f, causal: masks.Strided(f.stride)),
        # Sparse Transformer's strided pattern when causal; BigBird when bidirectional.
        ("sparse", lambda f, causal: masks.Strided(f.stride) if causal else _bigbird(f, causal)),
        ("bigbird", _bigbird), ("global", _global),
        # FAVOR+ linear attention (a layer value, not a mask): 'local,local,local,favor'.
        ("favor", _favor),
        # Local softmax plus a gated FAVOR+ path over every key, in one layer.
        ("local_favor", _local_global)):
    register_pattern(_name, lambda f, *, causal, _fn=_fn: _fn(f, causal))

for _name, _fn in (
        ("rope", lambda f: positions.RoPE(f.rope_base, f.rope_scaling, f.max_len)),
        ("sinusoidal", lambda f: positions.Sinusoidal()),
        ("learned", lambda f: positions.Learned(f.max_len)),
        ("t5", lambda f: positions.T5Bias(f.t5_buckets, f.t5_max_distance)),
        ("alibi", lambda f: positions.ALiBi()),
        ("none", lambda f: positions.NoPositions())):
    register_positions(_name, _fn)

_POOLERS = {"mean": heads.MeanPool(), "cls": heads.ClsPool()}


def _vocab(f: "ModelFlags") -> dict:
    return dict(tie=f.tie_embeddings, bias=f.head_bias, scale=f.head_scale,
                softcap=f.final_softcap)


for _name, _fn in (
        ("lm", lambda f: heads.LMHead(**_vocab(f))),
        ("mlm", lambda f: heads.MLMHead(**_vocab(f), transform=f.head_transform)),
        ("seq_cls", lambda f: heads.Classifier(f.num_classes, _POOLERS[f.pooler], f.head_bias)),
        ("token_cls", lambda f: heads.TokenClassifier(f.num_classes, f.head_bias)),
        ("seq2seq", lambda f: heads.Seq2SeqLM(**_vocab(f), num_layers=f.num_decoder_layers,
                                              masks=f.layer_masks(causal=True)))):
    register_head(_name, _fn)

# name -> (function, gated)
ACTIVATIONS = {"relu": (jax.nn.relu, False), "gelu": (jax.nn.gelu, False),
               "gelu_exact": (mlp_lib.gelu_exact, False), "swiglu": (jax.nn.silu, True),
               "geglu": (jax.nn.gelu, True)}
NORMS = {"rmsnorm": norms.RMSNorm, "layernorm": norms.LayerNorm}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# -- the flat flags -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelFlags:
    """The flat ``config.model.*`` fields of an experiment config; :func:`parse` makes the
    value tree. Validated at construction: errors name the flag."""

    task: str = "lm"  # the head: lm, mlm, seq_cls, token_cls, seq2seq, or a registered one
    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_decoder_layers: int | None = None  # seq2seq only; None means num_layers
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: from the `attention` preset (MHA by default)
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 256
    activation: str = "gelu"
    norm: str = "rmsnorm"
    pre_norm: bool = True
    positions: str = "rope"
    max_len: int = 512  # learned positions' table
    dropout_rate: float = 0.0
    tie_embeddings: bool = True
    attention: str = "mha"  # heads preset and/or pattern, joined by '+': gqa+local
    layer_pattern: tuple[str, ...] = ()  # per-layer pattern names, cycled over the layers
    window: int = 64
    stride: int = 8
    sparse_block: int = 16
    num_classes: int = 2
    implementation: tuple[str, ...] = DEFAULT_IMPLEMENTATION
    dtype: str = "float32"
    norm_eps: float = 1e-6  # epsilon of every LayerNorm / RMSNorm
    rope_base: float = 10000.0  # RoPE's theta: the angle of dimension pair i is p * base^(-2i/H)
    rope_scaling: RopeScaling | None = None  # long-context RoPE frequencies (linear, yarn...)
    t5_buckets: int = 32  # T5 relative-position buckets
    t5_max_distance: int = 128  # T5: distances beyond share the last bucket
    attention_bias: bool = False  # biases on the q/k/v/o projections (GPT-2, BERT)
    attention_out_bias: bool | None = None  # bias on o; None: as attention_bias (Qwen2: False)
    mlp_bias: bool = False  # biases on the MLP projections (GPT-2, BERT)
    attention_scale: float | None = None  # logits scale; None: head_dim ** -0.5 (T5: 1.0)
    # Options of imported architectures (BERT, T5); the defaults change nothing.
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input; BERT: 2
    embed_norm: bool = False  # a norm right after the summed input embeddings (BERT)
    head_transform: bool = False  # dense + activation + norm before the vocab head (BERT MLM)
    head_bias: bool = False  # output biases on the vocab and class heads (BERT)
    head_scale: float = 1.0  # multiplies the last hidden state before the vocab head (T5)
    pooler: str = "mean"  # seq_cls: mean over valid tokens, or 'cls' = tanh(dense(first)) (BERT)
    # Options of Gemma 2; the defaults change nothing.
    sandwich_norm: bool = False  # also normalise each sub-layer's output (needs pre_norm)
    norm_unit_offset: bool = False  # rmsnorm scales by 1 + w, w from 0, in fp32 (Gemma)
    embed_scale: float = 1.0  # multiplies the token embeddings (Gemma: d_model ** 0.5)
    attention_softcap: float | None = None  # cap * tanh(logits / cap) in every attention layer
    final_softcap: float | None = None  # cap * tanh(logits / cap) on the vocabulary logits
    attention_sinks: bool = False  # a learned per-head sink logit in every attention layer
    # FAVOR+ layers (the `favor` pattern, tx.attention.favor): random features, chunk of the
    # causal form, training calls between feature redraws (0: fixed).
    linear_features: int = 256
    linear_chunk: int = 64
    linear_redraw: int = 0

    def __post_init__(self):
        if isinstance(self.implementation, str):
            object.__setattr__(self, "implementation", tuple(self.implementation.split(",")))
        if isinstance(self.layer_pattern, str):
            names = tuple(p for p in self.layer_pattern.split(",") if p)
            object.__setattr__(self, "layer_pattern", names)
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
                     "num_classes", "stride", "sparse_block", "window", "linear_features",
                     "linear_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive integer.")
        for value, field, allowed in ((self.task, "task", tasks()),
                                      (self.positions, "positions", position_schemes()),
                                      (self.norm, "norm", tuple(NORMS)),
                                      (self.activation, "activation", tuple(ACTIVATIONS)),
                                      (self.dtype, "dtype", tuple(DTYPES)),
                                      (self.pooler, "pooler", tuple(_POOLERS))):
            if value not in allowed:
                _fail(field, value, f"use one of {allowed}.")
        for name in self.layer_pattern:
            if name not in _PATTERNS:
                _fail("layer_pattern", self.layer_pattern, f"{name!r} is not one of "
                      f"{patterns()}; register your own with tx.flags.register_pattern.")
        heads_preset, _ = self._split_attention()
        kv = self.kv_heads
        if not 1 <= kv <= self.num_heads or self.num_heads % kv:
            _fail("num_kv_heads", kv, f"must divide num_heads={self.num_heads}; pick a "
                  "divisor of num_heads.")
        if heads_preset == "gqa" and not 1 < kv < self.num_heads:
            _fail("num_kv_heads", kv, f"attention='gqa' needs 1 < num_kv_heads < "
                  f"num_heads={self.num_heads}; use 'mqa' or 'mha' for the ends.")
        try:
            registry.check(self.implementation)
        except ValueError as e:
            raise ValueError(str(e).replace("implementation=", "implementation: ", 1)) from None
        if self.head_dim is None and self.d_model % self.num_heads:
            _fail("d_model", self.d_model, f"must be divisible by num_heads={self.num_heads} "
                  "when head_dim is implicit; set head_dim or change num_heads.")
        for name in ("norm_eps", "head_scale", "embed_scale"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0.")
        self._validate_gemma()
        if not self.rope_base > 1:
            _fail("rope_base", self.rope_base, "must be > 1, e.g. 10000.0.")
        if self.attention_scale is not None and not self.attention_scale > 0:
            _fail("attention_scale", self.attention_scale, "must be > 0, or None for "
                  "head_dim ** -0.5.")
        if isinstance(self.linear_redraw, bool) or not isinstance(self.linear_redraw, int) \
                or self.linear_redraw < 0:
            _fail("linear_redraw", self.linear_redraw, "must be an integer >= 0 (0: keep the "
                  "first draw of the features).")
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail("dropout_rate", self.dropout_rate, "must be in [0, 1).")
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) \
                or self.type_vocab_size < 0:
            _fail("type_vocab_size", self.type_vocab_size, "must be an integer >= 0 (0: no "
                  "token-type embeddings).")
        if self.rope_scaling is not None and (self.positions != "rope" or
                                              not isinstance(self.rope_scaling, RopeScaling)):
            _fail("rope_scaling", self.rope_scaling, "give a tx.layers.RopeScaling, with "
                  "positions='rope'.")

    def _validate_gemma(self) -> None:
        for name in ("attention_softcap", "final_softcap"):
            cap = getattr(self, name)
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                    or not 0 < cap < float("inf")):
                _fail(name, cap, "must be a finite float > 0 (Gemma 2: 50.0 in attention, "
                      "30.0 on the logits), or None for no cap.")
        if self.sandwich_norm and not self.pre_norm:
            _fail("sandwich_norm", self.sandwich_norm, "wraps the sub-layers of a pre-norm "
                  "block; set pre_norm=True, or sandwich_norm=False.")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            _fail("norm_unit_offset", self.norm_unit_offset, f"is an rmsnorm option (Gemma), "
                  f"not one of norm={self.norm!r}; set norm='rmsnorm' or leave it False.")

    def _split_attention(self) -> tuple[str, str | None]:
        """``attention`` as (heads preset, pattern name or None)."""
        heads_preset, pattern = "mha", None
        for part in self.attention.split("+"):
            if part in HEAD_PRESETS:
                heads_preset = part
            elif part in _PATTERNS:
                pattern = part
            else:
                _fail("attention", self.attention, f"{part!r} is not a variant; use one of "
                      f"{tuple(HEAD_PRESETS) + patterns()}, or join a heads and a pattern "
                      "with '+', e.g. 'gqa+local'.")
        return heads_preset, pattern

    @property
    def kv_heads(self) -> int:
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        return HEAD_PRESETS[self._split_attention()[0]](self.num_heads)

    def layer_masks(self, *, causal: bool) -> tuple[masks.Mask, ...]:
        """The mask schedule: ``layer_pattern``, else the ``attention`` preset's pattern."""
        _, pattern = self._split_attention()
        names = self.layer_pattern or (pattern or "full",)
        return tuple(_PATTERNS[name](self, causal=causal) for name in names)


def _norm(f: ModelFlags):
    unit_offset = dict(unit_offset=True) if f.norm_unit_offset else {}  # rmsnorm's alone
    return NORMS[f.norm](f.norm_eps, f.pre_norm, f.sandwich_norm, **unit_offset)


def parse(f: ModelFlags) -> ModelConfig:
    """The value tree the flat flags describe."""
    head = _HEADS[f.task](f)
    act, gated = ACTIVATIONS[f.activation]
    attention = AttentionConfig(
        num_heads=f.num_heads, num_kv_heads=f.kv_heads, head_dim=f.head_dim,
        masks=f.layer_masks(causal=head.causal), implementation=f.implementation,
        scale=f.attention_scale, bias=f.attention_bias, out_bias=f.attention_out_bias,
        score_mod=None if f.attention_softcap is None else score_mods.SoftCap(
            f.attention_softcap), sinks=f.attention_sinks)
    return ModelConfig(
        vocab_size=f.vocab_size, d_model=f.d_model, num_layers=f.num_layers,
        attention=attention, positions=_POSITIONS[f.positions](f),
        mlp=mlp_lib.MLPConfig(f.d_ff, act, gated, f.mlp_bias),
        norm=_norm(f), head=head,
        embed=EmbedConfig(type_vocab_size=f.type_vocab_size, norm=f.embed_norm,
                          scale=f.embed_scale),
        dropout_rate=f.dropout_rate, dtype=DTYPES[f.dtype])


def model_config(**flags) -> ModelConfig:
    """``parse(ModelFlags(**flags))``: a config from flag spellings, e.g.
    ``model_config(attention="gqa+local", window=128, num_heads=8)``."""
    return parse(ModelFlags(**flags))


CACHES = {"contiguous": generation.Contiguous, "paged": generation.Paged,
          "none": generation.Recompute}


def kv_storage(name: str):
    """The ``KVQuant`` of a ``--kv_dtype`` / ``inference.kv_dtype`` name (``auto``: None,
    the compute dtype; ``int8``; ``int4``: KIVI; ``int4_per_token``)."""
    if name == "auto":
        return None
    if name not in quant.KV_DTYPES:
        _fail("kv_dtype", name, f"use one of {('auto', *quant.KV_DTYPES)}.")
    return quant.KV_DTYPES[name]()


def cache(name: str, *, kv_dtype: str = "auto", **options):
    """The cache value of a ``--cache`` flag (``contiguous``, ``paged``, ``none``), storing
    K/V as ``kv_dtype`` names (``kv_storage``)."""
    if name not in CACHES:
        _fail("cache", name, f"use one of {tuple(CACHES)}.")
    kv = kv_storage(kv_dtype)
    if kv is None:
        return CACHES[name](**options)
    if name == "none":
        _fail("kv_dtype", kv_dtype, "needs a cache to quantise; use --cache=contiguous or "
              "--cache=paged, or kv_dtype=auto.")
    if kv.residual and name != "paged":
        _fail("kv_dtype", kv_dtype, "(KIVI) quantises keys per channel over full pages, so it "
              "needs --cache=paged; or use kv_dtype=int8 / int4_per_token.")
    return CACHES[name](kv=kv, **options)


def replace(f: ModelFlags, **changes) -> ModelFlags:
    return dataclasses.replace(f, **changes)
