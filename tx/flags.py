"""The flag edge: the one place where names become values, and values print back to names.

Researchers write ``--config.model.attention=gqa+local|global``, ``positions=t5``,
``layer_pattern=local,local,local,full``, ``window=128``. :class:`ModelFlags` holds these flat
fields and :func:`parse` turns them into a :class:`tx.config.ModelConfig` whose leaves are
values (masks, ``RoPE(...)``, ``LMHead(...)``...); :func:`to_flags` prints a config back, and
``parse(ModelFlags(**to_flags(c))) == c`` for every flag-built config.

The fields are not listed here. A few belong to every model (:data:`CORE`); every other field
is declared by the registered value that reads it (``window`` by the ``local`` pattern,
``t5_buckets`` by ``t5`` positions, ``pooler`` by the ``seq_cls`` task, ``norm_eps`` by every
norm), in the value's own file, through one registry type (:class:`tx.registry.Registry`).
A research file adds a variant, its fields and its printing in one call, e.g.
``register_positions("kerple", fn, fields=(Field("kerple_p", 1.0, "..."),))``; the name and
its fields then work from flags and are listed by ``--print_config`` with no other edit.

The grammar (``tx.attention.patterns``): patterns join with ``&`` and ``|`` as masks do; a
heads preset joins a pattern with ``+``; every tuple field takes a comma list. A spelling
means one value or is refused in one line naming the parts.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from tx.attention import favor as _favor  # noqa: F401  (registers 'favor', 'local_favor')
from tx.attention import fnet as _fnet  # noqa: F401  (registers 'fnet')
from tx.attention import mla as _mla  # noqa: F401  (registers 'mla')
from tx.attention import recurrent_ssd as _ssd  # noqa: F401  (registers 'gdn', 'mamba2'...)
from tx.attention import deberta as _deberta  # noqa: F401  (registers positions 'deberta')
from tx.attention import xl as _xl  # noqa: F401  (registers positions 'xl')
from tx.attention import modifiers
from tx.attention import patterns as pattern_lib
from tx.attention import registry
from tx.config import DEFAULT_IMPLEMENTATION, DTYPES, AttentionConfig, EmbedConfig, ModelConfig
from tx.inference.generation import cache, kv_storage  # noqa: F401  (the decoding flags)
from tx.layers import mlp as mlp_lib
from tx.layers import norms, positions
from tx.models import heads
from tx.registry import (Field, Registry, non_negative_int, optional, positive_float,
                         positive_int)

PATTERNS, HEAD_PRESETS = pattern_lib.PATTERNS, pattern_lib.HEAD_PRESETS
POSITIONS, TASKS, POOLERS = positions.SCHEMES, heads.TASKS, heads.POOLERS
NORMS, ACTIVATIONS, MODIFIERS = norms.NORMS, mlp_lib.ACTIVATIONS, modifiers.MODIFIERS


def _fail(field: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field}={value!r}: {fix}")


def register_pattern(name: str, fn: Callable, *, fields=(), prints=None) -> None:
    """``fn(flags, *, causal) -> Mask`` (or a layer value); ``causal`` is True in a decoder's
    self-attention. ``fields``: the :class:`Field` s it reads beyond the built-in ones;
    ``prints(value, causal) -> dict | None``: the fields that rebuild ``value``."""
    PATTERNS.register(name, fn, fields=fields, prints=prints)


def register_positions(name: str, fn: Callable, *, fields=(), prints=None) -> None:
    """``fn(flags) -> positions value`` (a value with ``build(cfg, *, causal, rngs)``)."""
    POSITIONS.register(name, fn, fields=fields, prints=prints)


def register_head(task: str, fn: Callable, *, fields=(), prints=None) -> None:
    """``fn(flags) -> head value`` (a value with ``build`` and ``loss``), selected by the
    ``task`` flag; a dataset of the same task name feeds it."""
    TASKS.register(task, fn, fields=fields, prints=prints)


patterns, position_schemes, tasks = PATTERNS.names, POSITIONS.names, TASKS.names


def _one_of(reg: Registry) -> Callable:
    hint = f"; register your own with {reg.register_hint}" if reg.register_hint else ""
    return lambda name, value: None if value in reg else f"use one of {reg.names()}{hint}."


def _names(name: str, value: Any) -> str | None:
    ok = isinstance(value, tuple) and all(isinstance(v, str) or callable(v) for v in value)
    return None if ok else "give a comma list of names, e.g. local,local,local,full."


# The fields of every model; each registered variant adds its own (see fields()).
CORE = (
    Field("task", "lm", "the head, and so the model family: lm, mlm, seq_cls, token_cls, "
          "seq2seq, or a registered one", check=_one_of(TASKS)),
    Field("vocab_size", 256, "tokens in the vocabulary", check=positive_int),
    Field("d_model", 64, "model width D", check=positive_int),
    Field("num_layers", 2, "blocks (the encoder's, for seq2seq)", check=positive_int),
    Field("num_heads", 4, "query heads N", check=positive_int),
    Field("num_kv_heads", None, "K/V heads K (1: MQA, N: MHA); None: from the attention "
          "preset, else N", type=int, check=optional(positive_int)),
    Field("head_dim", None, "H; None: d_model // num_heads", type=int,
          check=optional(positive_int)),
    Field("d_ff", 256, "MLP hidden units F", check=positive_int),
    Field("activation", "gelu", "the MLP's activation (swiglu, geglu: gated)",
          check=_one_of(ACTIVATIONS)),
    Field("norm", "rmsnorm", "the norm of every block", check=_one_of(NORMS)),
    Field("positions", "rope", "the position scheme", check=_one_of(POSITIONS)),
    Field("attention", "", "heads preset and/or pattern: gqa+local, mqa, local|global, "
          "(local|global)&strided; empty: MHA, full"),
    Field("layer_pattern", (), "per-layer patterns cycled over the layers: "
          "local,local,local,full", check=_names),
    Field("implementation", DEFAULT_IMPLEMENTATION, "attention backends tried in order, "
          "e.g. pallas,xla; empty: the device's (GPU: pallas,cudnn,xla; CPU: cpu,xla)",
          type=tuple, check=_names),
    Field("dtype", "float32", "activation dtype (parameters and softmax stay fp32)",
          check=_one_of(DTYPES)),
    Field("dropout_rate", 0.0, "dropout after attention and MLP, in [0, 1)",
          check=lambda n, v: None if isinstance(v, (int, float)) and 0 <= v < 1 else
          "must be in [0, 1)."),
    Field("mlp_bias", False, "biases on the MLP projections (GPT-2, BERT)"),
    Field("attention_bias", False, "biases on the q/k/v/o projections (GPT-2, BERT)"),
    Field("attention_out_bias", None, "bias on o; None: as attention_bias (Qwen2: False)",
          type=bool),
    Field("attention_scale", None, "logits scale; None: head_dim ** -0.5 (T5: 1.0)",
          type=float, check=optional(positive_float)),
    Field("attention_sinks", False, "a learned per-head sink logit in every attention layer"),
    Field("attention_qk_norm", False, "per-head q/k norms (the model's norm over head_dim, "
          "before RoPE: Qwen3, Gemma 3)"),
    Field("type_vocab_size", 0, "token-type embeddings added to the input (BERT: 2)",
          check=non_negative_int),
    Field("embed_norm", False, "a norm right after the summed input embeddings (BERT)"),
    Field("embed_scale", 1.0, "multiplies the token embeddings (Gemma: d_model ** 0.5)",
          check=positive_float),
    Field("memory_length", 0, "Transformer-XL recurrence: hidden states of earlier segments "
          "each layer attends to (train data must be contiguous); 0: off",
          check=non_negative_int),
)


def fields() -> dict[str, Field]:
    """Every model flag, in order: :data:`CORE`, then the fields the registered patterns,
    position schemes, score modifiers, norms and tasks declare (a name declared twice must
    agree)."""
    out: dict[str, Field] = {}
    for reg in (None, PATTERNS, POSITIONS, MODIFIERS, NORMS, TASKS):
        for f in CORE if reg is None else reg.fields():
            if f.name in out and out[f.name].default != f.default:
                raise ValueError(f"model flag {f.name!r} is declared twice, with defaults "
                                 f"{out[f.name].default!r} and {f.default!r}.")
            out.setdefault(f.name, f)
    return out


def _suggest(name: str, choices) -> str:
    near = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _normalise(field: Field, value: Any) -> Any:
    """Flag spellings to the field's type: a comma list (or ml_collections' one-element tuple
    holding one) for a tuple field; a list as a tuple."""
    if field.type is tuple:
        items = (value,) if isinstance(value, str) else tuple(value) \
            if isinstance(value, (list, tuple)) else value
        if isinstance(items, tuple):
            return tuple(p.strip() if isinstance(p, str) else p for item in items
                         for p in (item.split(",") if isinstance(item, str) else (item,))
                         if not isinstance(p, str) or p.strip())
    if field.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class ModelFlags:
    """The flat ``config.model.*`` fields of an experiment (every name in :func:`fields`);
    validated at construction, errors name the flag. :func:`parse` makes the value tree."""

    __slots__ = ("_values",)

    def __init__(self, **values):
        known = fields()
        for name in values:
            if name not in known:
                raise ValueError(f"{name}: not a model flag{_suggest(name, known)} (the model "
                                 f"flags: {', '.join(known)}).")
        merged = {name: f.default for name, f in known.items()}
        merged.update({name: _normalise(known[name], v) for name, v in values.items()})
        object.__setattr__(self, "_values", merged)
        _validate(self, known)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"ModelFlags has no field {name!r}"
                                 f"{_suggest(name, self._values)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("ModelFlags is frozen; use flags.replace(field=value).")

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelFlags) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        defaults = fields()
        changed = ", ".join(f"{k}={v!r}" for k, v in self._values.items()
                            if k not in defaults or v != defaults[k].default)
        return f"ModelFlags({changed})"

    def replace(self, **changes) -> "ModelFlags":
        return ModelFlags(**{**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    # -- derived ------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        preset, _ = pattern_lib.split_attention(self.attention)
        return HEAD_PRESETS[preset or "mha"](self.num_heads)

    def layer_masks(self, *, causal: bool) -> tuple:
        """The schedule: ``layer_pattern``, else the ``attention`` pattern, else ``full``."""
        _, pattern = pattern_lib.split_attention(self.attention)
        exprs = self.layer_pattern or (pattern or "full",)
        flag = "layer_pattern" if self.layer_pattern else "attention"
        return tuple(pattern_lib.build(e, self, causal=causal, flag=flag) for e in exprs)


def replace(f: ModelFlags, **changes) -> ModelFlags:
    return f.replace(**changes)


# -- validation ----------------------------------------------------------------------------------
def _validate(f: ModelFlags, known: dict[str, Field]) -> None:
    for name, field in known.items():
        field.validate(getattr(f, name))
    preset, pattern = pattern_lib.split_attention(f.attention)
    if pattern is not None and f.layer_pattern:
        _fail("attention", f.attention, f"names the pattern {pattern!r} and layer_pattern="
              f"{','.join(map(str, f.layer_pattern))} names every layer's; keep one (the heads "
              f"preset alone may stay: attention={preset or ''!r}).")
    _validate_heads(f, preset)
    try:
        registry.check(f.implementation)
    except ValueError as e:
        raise ValueError(str(e).replace("implementation=", "implementation: ", 1)) from None
    if f.head_dim is None and f.d_model % f.num_heads:
        _fail("d_model", f.d_model, f"must be divisible by num_heads={f.num_heads} when "
              "head_dim is implicit; set head_dim or change num_heads.")
    for reg in (PATTERNS, POSITIONS, NORMS, TASKS):
        if reg.check is not None:
            reg.check(f)
    f.layer_masks(causal=TASKS[f.task](f).causal)  # every pattern expression builds


_PRESET_MEANS = {"mha": "num_kv_heads == num_heads", "mqa": "num_kv_heads == 1",
                 "gqa": "1 < num_kv_heads < num_heads"}


def _validate_heads(f: ModelFlags, preset: str | None) -> None:
    kv = f.kv_heads
    if not 1 <= kv <= f.num_heads or f.num_heads % kv:
        _fail("num_kv_heads", kv, f"must divide num_heads={f.num_heads}; pick a divisor of "
              "num_heads.")
    fits = {"mha": kv == f.num_heads, "mqa": kv == 1, "gqa": 1 < kv < f.num_heads}
    if preset in fits and not fits[preset]:
        if f.num_kv_heads is not None:
            _fail("attention", f.attention, f"the preset {preset!r} means "
                  f"{_PRESET_MEANS[preset]}, which contradicts num_kv_heads={kv} with "
                  f"num_heads={f.num_heads}; drop the preset or num_kv_heads.")
        _fail("num_kv_heads", kv, f"attention={preset!r} needs {_PRESET_MEANS[preset]} "
              f"(num_heads={f.num_heads}); use 'mqa' or 'mha' for the ends.")


# -- flags -> values -----------------------------------------------------------------------------
def parse(f: ModelFlags) -> ModelConfig:
    """The value tree the flat flags describe."""
    head = TASKS[f.task](f)
    act, gated = ACTIVATIONS[f.activation]
    attention = AttentionConfig(
        num_heads=f.num_heads, num_kv_heads=f.kv_heads, head_dim=f.head_dim,
        masks=f.layer_masks(causal=head.causal), implementation=f.implementation,
        scale=f.attention_scale, bias=f.attention_bias, out_bias=f.attention_out_bias,
        score_mod=modifiers.build(f), sinks=f.attention_sinks,
        qk_norm=f.attention_qk_norm)
    return ModelConfig(
        vocab_size=f.vocab_size, d_model=f.d_model, num_layers=f.num_layers,
        attention=attention, positions=POSITIONS[f.positions](f),
        mlp=mlp_lib.MLPConfig(f.d_ff, act, gated, f.mlp_bias),
        norm=NORMS[f.norm](f), head=head,
        embed=EmbedConfig(type_vocab_size=f.type_vocab_size, norm=f.embed_norm,
                          scale=f.embed_scale),
        dropout_rate=f.dropout_rate, dtype=DTYPES[f.dtype], memory_length=f.memory_length)


def model_config(**flags) -> ModelConfig:
    """``parse(ModelFlags(**flags))``: a config from flag spellings, e.g.
    ``model_config(attention="gqa+local", window=128, num_heads=8)``."""
    return parse(ModelFlags(**flags))


# -- values -> flags -----------------------------------------------------------------------------
def _spelled(reg: Registry, value: Any, what: str, *args) -> tuple[str, dict]:
    found = reg.spell(value, *args)
    if found is None:
        raise ValueError(f"{what}={value!r} is no registered {reg.kind}: it has no flag "
                         f"spelling; register it ({reg.register_hint or 'its registry'}) with "
                         "prints=... to print it.")
    return found


def _merge(out: dict, more: dict, what: str) -> None:
    for k, v in more.items():
        if k in out and out[k] != v:
            raise ValueError(f"{what} needs {k}={v!r} where another part needs {out[k]!r}: no "
                             "single set of flags builds this config.")
        out[k] = v


def _schedule(config: ModelConfig) -> dict:
    """``attention`` or ``layer_pattern`` and the fields the masks read. A seq2seq head's
    decoder masks are the same spellings built causal, so each layer takes a spelling that
    rebuilds both; to_flags then checks the whole rebuild."""
    causal, head = config.head.causal, config.head
    decoder = getattr(head, "masks", ())
    exprs, out = [], {}
    for i, mask in enumerate(config.attention.masks):
        found = pattern_lib.spellings(mask, causal=causal)
        if decoder:
            both = {e for e, _ in pattern_lib.spellings(decoder[i % len(decoder)], causal=True)}
            found = [(e, fields) for e, fields in found if e in both]
        if not found:
            raise ValueError(f"attention.masks: {mask!r} is not spelled by any registered "
                             "pattern (nor an '&' / '|' of them); register it with "
                             "tx.flags.register_pattern(..., prints=...).")
        exprs.append(found[0][0])
        for k, v in found[0][1].items():
            out.setdefault(k, v)
    if decoder:  # a causal window pins `window` exactly (2k and 2k + 1 centre alike)
        for mask in decoder:
            for k, v in (pattern_lib.spell(mask, causal=True) or ("", {}))[1].items():
                out[k] = v
    if len(exprs) == 1 and exprs[0] != "full":  # "full" is what an empty attention means
        out["attention"] = exprs[0]
    elif exprs:
        out["layer_pattern"] = tuple(exprs)
    return out


def to_flags(config: ModelConfig) -> dict[str, Any]:
    """The model flags (those that differ from their defaults) that rebuild ``config``:
    ``parse(ModelFlags(**to_flags(config))) == config``. A config no flags can express (a
    callable implementation, a hand-built mask no pattern spells) raises a ValueError
    naming the part."""
    a, mlp = config.attention, config.mlp
    if not all(isinstance(i, str) for i in a.implementation):
        raise ValueError(f"attention.implementation={a.implementation!r}: a callable has no "
                         "flag spelling; register it with tx.attention.register(name, fn).")
    out = dict(
        vocab_size=config.vocab_size, d_model=config.d_model, num_layers=config.num_layers,
        num_heads=a.num_heads, num_kv_heads=None if a.kv_heads == a.num_heads else a.kv_heads,
        head_dim=a.head_dim, d_ff=mlp.d_ff, mlp_bias=mlp.bias,
        activation=_spelled(ACTIVATIONS, (mlp.activation, mlp.gated), "mlp.activation")[0],
        implementation=tuple(a.implementation), attention_scale=a.scale,
        attention_bias=a.bias, attention_out_bias=a.out_bias, attention_sinks=a.sinks,
        attention_qk_norm=a.qk_norm,
        **modifiers.spell(a.score_mod),
        type_vocab_size=config.embed.type_vocab_size, embed_norm=config.embed.norm,
        embed_scale=config.embed.scale, dropout_rate=config.dropout_rate,
        memory_length=config.memory_length,
        dtype=_spelled(DTYPES, config.dtype, "dtype")[0])
    for flag, reg, value in (("task", TASKS, config.head), ("positions", POSITIONS,
                                                             config.positions),
                             ("norm", NORMS, config.norm)):
        name, more = _spelled(reg, value, flag)
        out[flag] = name
        _merge(out, more, flag)
    _merge(out, _schedule(config), "attention.masks")
    known = fields()
    out = {k: v for k, v in out.items() if v != known[k].default}
    rebuilt = parse(ModelFlags(**out))
    if rebuilt != config:
        diff = [k for k in ("attention", "positions", "mlp", "norm", "head", "embed")
                if getattr(rebuilt, k) != getattr(config, k)]
        raise ValueError(f"no flags rebuild this config exactly (its {', '.join(diff) or 'dtype'}"
                         " differs from the nearest spelling).")
    return out


def flag_args(values: dict[str, Any], prefix: str = "--config.model.") -> list[str]:
    """``to_flags`` output as command-line arguments (tuples as comma lists)."""
    def spell(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return [f"{prefix}{k}={spell(v)}" for k, v in values.items()]
