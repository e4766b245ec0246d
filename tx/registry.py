"""Named variants, extended from research code: the one registry type behind every flag name.

A :class:`Registry` maps the names a flag accepts to what they stand for (a builder, a value, a
module), and each entry declares the flag fields it reads (:class:`Field`: name, default, one
line of doc, a check) and how a value prints back to flags (``prints``). The value's own file
registers it, so a new variant adds no line anywhere else:

    POSITIONS.register("t5", lambda f: T5Buckets(f.t5_buckets, f.t5_max_distance),
                       fields=(Field("t5_buckets", 32, "relative-position buckets"), ...),
                       prints=lambda v: isinstance(v, T5Buckets) and dict(t5_buckets=...))

``tx.flags`` collects every registry's fields into the ``--config.model.*`` flags, so a
registered field is listed by ``--print_config`` and type-checked like the built-in ones.

This module is a leaf of the import graph (the standard library only): every value module may
import it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Iterator

_NO_CHECK = None


def positive_int(name: str, value: Any) -> str | None:
    """A :class:`Field` check: a positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be a positive integer."
    return None


def non_negative_int(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be an integer >= 0."
    return None


def positive_float(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < float("inf"):
        return "must be a finite number > 0."
    return None


def optional(check: Callable) -> Callable:
    """``check``, with ``None`` allowed (the field's "off" or "derived" value)."""
    return lambda name, value: None if value is None else check(name, value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One flag field a value reads: ``--config.model.<name>``.

    ``type`` is what the flag parses to (``int``, ``float``, ``bool``, ``str``, ``tuple``);
    ``None`` takes the default's type (a ``None`` default needs it). ``check(name, value)``
    returns ``None`` when the value is fine, else the fix (the error names field and value).
    """

    name: str
    default: Any
    doc: str
    type: Any = None
    check: Callable[[str, Any], str | None] | None = _NO_CHECK

    def __post_init__(self):
        if self.type is None:
            if self.default is None:
                raise ValueError(f"Field {self.name!r}: a None default needs type=...")
            object.__setattr__(self, "type", type(self.default))
        if "\n" in self.doc:
            raise ValueError(f"Field {self.name!r}: the doc is one line; got {self.doc!r}.")

    def validate(self, value: Any) -> None:
        if self.check is not None:
            fix = self.check(self.name, value)
            if fix:
                raise ValueError(f"{self.name}={value!r}: {fix}")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    value: Any  # what the name stands for: a builder, a value, a module
    fields: tuple[Field, ...] = ()
    # value -> the flag fields that rebuild it when it is this entry's (else None / False)
    prints: Callable[..., dict | None] | None = None
    doc: str = ""


def _suggest(name: str, choices) -> str:
    near = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""


class Registry:
    """The names of one kind of variant. ``flag`` is the flag (or option) the names are
    spelled in; ``register_hint`` says how research code adds one (for error messages);
    ``fields`` are read by every entry of the kind (e.g. ``norm_eps`` by every norm);
    ``check(flags)`` refuses combinations of the kind's fields (raises a ValueError)."""

    def __init__(self, kind: str, flag: str, *, fields: tuple[Field, ...] = (),
                 register_hint: str | None = None, check: Callable | None = None):
        self.kind, self.flag = kind, flag
        self.shared_fields = tuple(fields)
        self.check = check
        self.register_hint = register_hint
        self._entries: dict[str, Entry] = {}

    # -- registering ------------------------------------------------------------------------
    def register(self, name: str, value: Any = None, *, fields: tuple[Field, ...] = (),
                 prints: Callable | None = None, doc: str = ""):
        """Adds (or replaces) ``name``. Without ``value``, a decorator:
        ``@REG.register("mine")``. Returns ``value``."""
        if value is None:
            return lambda v: self.register(name, v, fields=fields, prints=prints, doc=doc)
        if not isinstance(name, str) or not name or not name.replace("_", "").replace(
                "-", "").replace(".", "").isalnum():
            raise ValueError(f"{self.kind} name={name!r}: use a non-empty name of letters, "
                             "digits, '_', '-' or '.' (no '+', ',', '&', '|' or spaces: those "
                             "join names in flags).")
        for f in fields:
            if not isinstance(f, Field):
                raise ValueError(f"{self.kind} {name!r}: fields={fields!r}: give "
                                 "tx.registry.Field values.")
        self._entries[name] = Entry(name, value, tuple(fields), prints, doc)
        return value

    # -- looking up -------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self:
            hint = f"; register your own with {self.register_hint}" if self.register_hint \
                else ""
            raise ValueError(f"{self.flag}={name!r}: not a {self.kind}{_suggest(name, self)}; "
                             f"use one of {self.names()}{hint}.")
        return self._entries[name]

    def __getitem__(self, name: str) -> Any:
        return self.entry(name).value

    def items(self):
        return ((name, e.value) for name, e in self._entries.items())

    def fields(self) -> tuple[Field, ...]:
        """Every field of the kind: the shared ones, then each entry's, once each by name."""
        out: dict[str, Field] = {}
        for f in self.shared_fields + tuple(f for e in self._entries.values() for f in e.fields):
            if f.name in out and out[f.name].default != f.default:
                raise ValueError(f"{self.kind}: field {f.name!r} is declared twice with "
                                 f"defaults {out[f.name].default!r} and {f.default!r}.")
            out.setdefault(f.name, f)
        return tuple(out.values())

    # -- printing back ----------------------------------------------------------------------
    def spellings(self, value: Any, *args) -> list[tuple[str, dict]]:
        """Every ``(name, fields)`` whose entry claims ``value``: its ``prints(value, *args)``
        gives the fields that rebuild it; an entry without ``prints`` claims a value equal to
        its own."""
        out = []
        for name, e in self._entries.items():
            if e.prints is not None:
                got = e.prints(value, *args)
                if got is not None and got is not False:
                    out.append((name, dict(got)))
            elif _same(e.value, value):
                out.append((name, {}))
        return out

    def spell(self, value: Any, *args) -> tuple[str, dict] | None:
        """The first of :meth:`spellings`, or None when no entry claims ``value``."""
        found = self.spellings(value, *args)
        return found[0] if found else None

    def name_of(self, value: Any, *args) -> str:
        found = self.spell(value, *args)
        if found is None:
            raise ValueError(f"{value!r} is not a registered {self.kind}; register it with "
                             f"{self.register_hint or 'its registry'} to print it as a flag.")
        return found[0]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # arrays and other values without a plain ==
        return a is b
