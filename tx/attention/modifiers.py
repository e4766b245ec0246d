"""Flag names of score modifiers (``kernels.score_mods``) applied in every attention layer.

Each registered modifier declares the flag field it reads and builds its value from the flags,
``None`` when off; :func:`build` chains the ones that are on, after the position scheme's own
(T5 buckets, ALiBi). A research file adds one with ``MODIFIERS.register(name, fn, fields=...,
prints=...)``; its field then works from ``--config.model.*`` and prints back.
"""

from __future__ import annotations

from tx.kernels import score_mods
from tx.registry import Field, Registry, optional, positive_float

MODIFIERS = Registry("score modifier", "attention_softcap",
                     register_hint="tx.attention.modifiers.MODIFIERS.register(name, fn, "
                     "fields=..., prints=...)")

MODIFIERS.register(
    "softcap", lambda f: None if f.attention_softcap is None else score_mods.SoftCap(
        f.attention_softcap),
    fields=(Field("attention_softcap", None, "cap * tanh(logits / cap) in every attention "
                  "layer (Gemma 2: 50.0); None: off", type=float,
                  check=optional(positive_float)),),
    prints=lambda v: type(v) is score_mods.SoftCap and dict(attention_softcap=v.cap))


def build(f) -> score_mods.ScoreMod | None:
    """The chain of every registered modifier the flags turn on (None: none is)."""
    return score_mods.chain(*(fn(f) for _, fn in MODIFIERS.items()))


def spell(score_mod) -> dict:
    """The fields that rebuild ``score_mod`` (a registered modifier, or a chain of them)."""
    parts = score_mod.mods if isinstance(score_mod, score_mods.Chain) else \
        (() if score_mod is None else (score_mod,))
    out = {}
    for mod in parts:
        found = MODIFIERS.spell(mod)
        if found is None:
            raise ValueError(f"attention.score_mod={mod!r} is no registered score modifier: it "
                             f"has no flag spelling; register it with {MODIFIERS.register_hint}.")
        out.update(found[1])
    return out
