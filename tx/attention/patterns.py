"""Pattern and heads spellings: the flag grammar of the attention variant.

The grammar is the mask algebra's (``kernels.masks``), written in names:

* a pattern expression joins registered pattern names with ``&`` (both see the key) and ``|``
  (either sees it), ``&`` binding tighter, with parentheses: ``local|global``,
  ``(local|global)&strided``;
* ``attention`` is an optional heads preset and an optional pattern, joined by ``+``:
  ``gqa+local|global``, ``mqa``, ``local``;
* a per-layer schedule (``layer_pattern``) is a comma list of pattern expressions:
  ``local,local,local,full``.

Every spelling means one value or is refused in one line naming the parts; nothing is dropped.
:func:`spell` prints a mask (or a layer value) back to an expression and the fields it reads.

Patterns are registered here for ``kernels.masks`` values and by their own files for layer
values (``tx.attention.favor``); research code registers its own with
``tx.flags.register_pattern`` (``PATTERNS.register``).
"""

from __future__ import annotations

import re
from typing import Any

from tx.kernels import masks
from tx.registry import Field, Registry, positive_int

PATTERNS = Registry("pattern", "attention/layer_pattern",
                    register_hint="tx.flags.register_pattern(name, fn, fields=...)")
# name -> (num_heads -> num_kv_heads, or None when num_kv_heads decides)
HEAD_PRESETS = Registry("heads preset", "attention")
HEAD_PRESETS.register("mha", lambda n: n)
HEAD_PRESETS.register("mqa", lambda n: 1)
HEAD_PRESETS.register("gqa", lambda n: max(1, n // 2))

_TOKEN = re.compile(r"\s*([A-Za-z0-9_.\-]+|[&|()])")


def _fail(flag: str, value: Any, fix: str):
    raise ValueError(f"{flag}={value!r}: {fix}")


# -- reading ------------------------------------------------------------------------------------
def names_in(expr: str) -> list[str]:
    """The pattern names an expression mentions."""
    return [t for t in _tokens("pattern", expr) if t not in "&|()"]


def _tokens(flag: str, expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            _fail(flag, expr, f"cannot read {expr[pos:]!r}; join pattern names with '&' or "
                  "'|', e.g. 'local|global'.")
        out.append(m.group(1))
        pos = m.end()
    return out


def build(expr: str, flags, *, causal: bool, flag: str = "attention"):
    """The value of a pattern expression (a ``Mask``, or a layer value such as ``Favor``)."""
    tokens = _tokens(flag, expr)
    if not tokens:
        _fail(flag, expr, "give a pattern name, e.g. 'full' or 'local'.")
    value, rest = _or(tokens, flags, causal, flag, expr)
    if rest:
        _fail(flag, expr, f"unexpected {rest[0]!r}; join patterns with '&' or '|'.")
    return value


_OPERATORS = "|&"  # loosest first: '&' binds tighter than '|'


def _or(tokens, flags, causal, flag, expr, level: int = 0):
    """One precedence level: operands of the next level joined by ``_OPERATORS[level]``."""
    if level == len(_OPERATORS):
        return _atom(tokens, flags, causal, flag, expr)
    value, tokens = _or(tokens, flags, causal, flag, expr, level + 1)
    while tokens and tokens[0] == _OPERATORS[level]:
        other, tokens = _or(tokens[1:], flags, causal, flag, expr, level + 1)
        value = _join(value, other, _OPERATORS[level], flag, expr)
    return value, tokens


def _atom(tokens, flags, causal, flag, expr):
    if not tokens:
        _fail(flag, expr, "ends after an operator; give a pattern name after '&' or '|'.")
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        value, rest = _or(rest, flags, causal, flag, expr)
        if not rest or rest[0] != ")":
            _fail(flag, expr, "a '(' is not closed.")
        return value, rest[1:]
    if head in "&|)":
        _fail(flag, expr, f"unexpected {head!r}; a pattern name must come first.")
    if head in HEAD_PRESETS:
        _fail(flag, expr, f"{head!r} is a heads preset, not a pattern; join it with '+' "
              f"before the pattern, e.g. '{head}+local'.")
    if head not in PATTERNS:
        _fail(flag, expr, f"{head!r} is not a pattern; use one of {PATTERNS.names()} joined "
              f"with '&' / '|', or register your own with {PATTERNS.register_hint}.")
    return PATTERNS[head](flags, causal=causal), rest


def _join(a, b, op: str, flag: str, expr: str):
    for value in (a, b):
        if not isinstance(value, masks.Mask):
            _fail(flag, expr, f"{type(value).__name__} is a layer of its own, not a mask; it "
                  f"cannot be joined with {op!r}. Give it its own layer in layer_pattern.")
    return a & b if op == "&" else a | b


def split_attention(spelling: str) -> tuple[str | None, str | None]:
    """``attention`` as (heads preset or None, pattern expression or None); refuses two
    presets, two patterns, and empty parts, naming both parts."""
    preset, pattern = None, None
    if not spelling.strip():
        return None, None
    for part in (p.strip() for p in spelling.split("+")):
        if not part:
            _fail("attention", spelling, "has an empty part; join a heads preset and a pattern "
                  "with one '+', e.g. 'gqa+local'.")
        if part in HEAD_PRESETS:
            if preset is not None:
                _fail("attention", spelling, f"names two heads presets, {preset!r} and "
                      f"{part!r}; keep one (or set num_kv_heads).")
            preset = part
        else:
            if pattern is not None:
                _fail("attention", spelling, f"names two patterns, {pattern!r} and {part!r}, "
                      f"without an operator; write '{pattern}&{part}' (keys both allow) or "
                      f"'{pattern}|{part}' (keys either allows).")
            names_in(part)  # a bad character fails here, naming the spelling
            pattern = part
    return preset, pattern


# -- printing back ------------------------------------------------------------------------------
def spell(value, *, causal: bool) -> tuple[str, dict] | None:
    """``(expression, fields)`` that rebuild ``value``, or None when no registered pattern
    (nor an ``&`` / ``|`` of them) does. Fields read by two parts must agree."""
    found = spellings(value, causal=causal)
    return found[0] if found else None


def spellings(value, *, causal: bool) -> list[tuple[str, dict]]:
    """Every expression that rebuilds ``value`` (a name may mean another mask elsewhere:
    ``sparse`` is strided when causal, BigBird when not; a seq2seq config needs the one
    that rebuilds both its encoder and its decoder)."""
    return [found[:2] for found in _spell(value, causal)]


def _spell(value, causal: bool) -> list[tuple[str, dict, str]]:
    """Also the top-level operator of each expression ('' for a name), for parentheses."""
    out = [(*found, "") for found in PATTERNS.spellings(value, causal)]
    if out or not isinstance(value, (masks.And, masks.Or)):
        return out
    op = "&" if isinstance(value, masks.And) else "|"
    for a in _spell(value.a, causal):
        for b in _spell(value.b, causal):
            fields = dict(a[1])
            if any(fields.get(k, v) != v for k, v in b[1].items()):
                continue
            fields.update(b[1])
            # Operators read left to right and '&' binds tighter: a right operand that is
            # itself a composite, and an '|' inside an '&', need parentheses.
            left = f"({a[0]})" if op == "&" and a[2] == "|" else a[0]
            right = f"({b[0]})" if b[2] else b[0]
            out.append((f"{left}{op}{right}", fields, op))
    return out


# -- the built-in patterns of kernels.masks -----------------------------------------------------
WINDOW = Field("window", 64, "keys a local/global layer sees (causal: the last `window`)",
               check=positive_int)
STRIDE = Field("stride", 8, "the strided pattern's stride (Sparse Transformer)",
               check=positive_int)
SPARSE_BLOCK = Field("sparse_block", 16, "BigBird's block size (bidirectional sparse)",
                     check=positive_int)


def window(f, causal: bool) -> masks.Mask:
    """A window of ``window`` keys: Mistral's ``Local(W - 1)`` when causal, centred
    otherwise."""
    w = f.window
    return masks.Local(w - 1) if causal else masks.Local(w // 2, w // 2)


def _window_fields(m, causal: bool) -> dict | None:
    if type(m) is not masks.Local:
        return None
    if causal and m.right == 0:
        return dict(window=m.left + 1)
    if not causal and m.left == m.right:
        return dict(window=2 * m.left or 1)  # window=1 centres Local(0, 0) as 0 would
    return None


def _bigbird(f, causal: bool) -> masks.Mask:
    bb = masks.BigBird(f.sparse_block, window_blocks=3, global_blocks=1, random_blocks=1)
    return bb & masks.Causal() if causal else bb


def _bigbird_fields(m, causal: bool) -> dict | None:
    if causal:
        if not (isinstance(m, masks.And) and m.b == masks.Causal()):
            return None
        m = m.a
    if type(m) is masks.BigBird and m == masks.BigBird(m.block, 3, 1, 1):
        return dict(sparse_block=m.block)
    return None


_GLOBALS = masks.GlobalTokens((0,))


def _global(f, causal: bool) -> masks.Mask:
    glob = window(f, causal) | _GLOBALS
    return glob & masks.Causal() if causal else glob


def _global_fields(m, causal: bool) -> dict | None:
    if causal:
        if not (isinstance(m, masks.And) and m.b == masks.Causal()):
            return None
        m = m.a
    if isinstance(m, masks.Or) and m.b == _GLOBALS:
        return _window_fields(m.a, causal)
    return None


def _everything(f, causal: bool) -> masks.Mask:
    return masks.Causal() if causal else masks.Full()


def _strided_fields(m, causal: bool) -> dict | None:
    return dict(stride=m.stride) if type(m) is masks.Strided else None


def _sparse(f, causal: bool) -> masks.Mask:
    # Sparse Transformer's strided pattern when causal; BigBird when bidirectional.
    return masks.Strided(f.stride) if causal else _bigbird(f, causal)


for _name, _fn, _fields, _prints in (
        ("full", _everything, (), lambda m, causal: m == _everything(None, causal) and {}),
        ("causal", _everything, (), lambda m, causal: m == _everything(None, causal) and {}),
        ("local", window, (WINDOW,), _window_fields),
        ("strided", lambda f, causal: masks.Strided(f.stride), (STRIDE,), _strided_fields),
        ("sparse", _sparse, (STRIDE, SPARSE_BLOCK),
         lambda m, causal: _strided_fields(m, causal) if causal else _bigbird_fields(m, causal)),
        ("bigbird", _bigbird, (SPARSE_BLOCK,), _bigbird_fields),
        ("global", _global, (WINDOW,), _global_fields)):
    PATTERNS.register(_name, lambda f, *, causal, _fn=_fn: _fn(f, causal), fields=_fields,
                      prints=_prints)
