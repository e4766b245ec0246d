"""A paged KV cache: the host-side page pool (vLLM's block manager) and two device helpers.

The pool hands out physical pages of ``page_size`` token slots to sequences. Each sequence
owns a *block table* (its logical pages -> physical pages) and a length; the decode kernel
(``kernels.paged_attention``) reads K/V through that table. Everything here is plain Python and
numpy, run between jitted steps; the device only ever sees int32 arrays
(``block_table``, ``lengths``, the ``slots`` to write and the page ``copies``).

* Pages are allocated on demand as tokens are appended, from a free list; each page carries a
  reference count (the number of block tables that hold it) and returns to the free list when
  it drops to zero.
* Prefix sharing: a full page is immutable, so it is registered under a key made of its
  parent page and its tokens (a chained hash of the token prefix). A new sequence whose first
  full pages have the same tokens reuses those physical pages instead of storing them again
  (a shared system prompt is stored once).
* ``fork`` shares every page of a sequence (beam search, parallel sampling). Appending into a
  partly filled page that another sequence also holds first copies it (copy-on-write): the
  ``Update`` lists the ``(src_page, dst_page)`` copies the device must perform before it
  writes the new tokens' K/V into ``slots``.
* Sealing: a page is *sealed* once a sequence's length passes its end; from then on it is
  immutable (no slot of it is written again, it is never the source of a copy-on-write), which
  is what lets prefix sharing reuse it and a quantised cache (``tx.attention.quant``, KIVI)
  quantise it once. ``Update.sealed`` lists the pages an update sealed.
* Running out of pages raises ``OutOfPages`` *before* any state changes (check with
  ``can_allocate`` to make a request wait instead); no sequence's data is ever overwritten.

Device side: ``copy_pages`` then ``write_kv`` apply an ``Update`` to ``[K, P, L, H]`` pools
(K/V-head major, as ``kernels.paged_attention`` reads them).
Apply updates in the order the pool returned them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tx.kernels.paged_attention import check_block_tables
from tx.attention.paged import copy_page_pairs

__all__ = ["PagePool", "Update", "OutOfPages", "copy_pages", "write_kv"]


class OutOfPages(RuntimeError):
    """Not enough free pages for the request; the pool is unchanged (retry after a free)."""


@dataclasses.dataclass(frozen=True)
class Update:
    """What the device must do after ``add_sequence`` / ``append``.

    Attributes:
      seq_id: the sequence.
      copies: ``(src_page, dst_page)`` page copies to perform first (copy-on-write).
      start: position of the first token whose K/V must be written; positions before it are
        already cached (the old length, or the shared prefix of a new sequence).
      slots: int32 ``[length - start]`` flat slot ``page * page_size + offset`` of positions
        ``start .. length - 1`` (the layout of ``pages.reshape(P * L, ...)``).
      sealed: the physical pages this update filled, in order (each is sealed once).
    """

    seq_id: int
    copies: tuple[tuple[int, int], ...]
    start: int
    slots: np.ndarray
    sealed: tuple[int, ...] = ()


@dataclasses.dataclass
class _Sequence:
    pages: list[int]
    length: int
    tokens: list[int] | None  # None once an append gave a count instead of token ids


class PagePool:
    """Page allocator with reference counts, prefix sharing and copy-on-write.

    Args:
      num_pages: physical pages ``P`` in the device pools.
      page_size: token slots per page ``L``.
      prefix_sharing: share full pages of identical token prefixes between sequences.
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_sharing: bool = True):
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.prefix_sharing = prefix_sharing
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._refcount = np.zeros(self.num_pages, np.int64)
        self._seqs: dict[int, _Sequence] = {}
        self._next_id = 0
        # key = (parent page or -1, tokens of the page) -> physical page, for full pages.
        self._prefix: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._sealed: set[int] = set()

    # --- queries ---------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    def is_sealed(self, page: int) -> bool:
        """Whether ``page`` is full (immutable until it returns to the free list)."""
        return page in self._sealed

    def pages(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).pages)

    def length(self, seq_id: int) -> int:
        return self._seq(seq_id).length

    def lengths(self, seq_ids: Sequence[int]) -> np.ndarray:
        """int32 ``[len(seq_ids)]`` token counts (the kernel's ``lengths``)."""
        return np.asarray([self._seq(s).length for s in seq_ids], np.int32)

    def block_table(self, seq_ids: Sequence[int], width: int | None = None, *,
                    pad: int = 0) -> np.ndarray:
        """int32 ``[len(seq_ids), width]`` physical page ids, padded with ``pad`` (entries past
        a sequence's pages are never read by the kernel). ``width`` defaults to the longest
        table; bucket it (a power of two) so the decode step does not recompile."""
        tables = [self._seq(s).pages for s in seq_ids]
        need = max((len(t) for t in tables), default=0)
        width = max(1, need) if width is None else width
        if need > width:
            raise ValueError(f"width={width} is too small: a sequence holds {need} pages; pass "
                             f"width >= {need}.")
        out = np.full((len(tables), width), pad, np.int32)
        for row, table in zip(out, tables):
            row[:len(table)] = table
        # The last host-side look before the table goes into a jitted step, where a bad id
        # would be clamped onto another sequence's page: cheap, and it names the culprit.
        check_block_tables(out, self.num_pages, lengths=self.lengths(seq_ids),
                           page_size=self.page_size, seq_ids=list(seq_ids))
        return out

    def pages_needed(self, num_tokens: int, seq_id: int | None = None,
                     tokens: Sequence[int] | None = None) -> int:
        """Free pages that appending ``num_tokens`` to ``seq_id`` (or adding a new sequence of
        ``tokens`` when ``seq_id`` is None) would take, copy-on-write and sharing included."""
        if seq_id is None:
            shared = len(self._match_prefix(tokens)) if tokens is not None else 0
            return -(-num_tokens // self.page_size) - shared
        seq, size = self._seq(seq_id), self.page_size
        room = -seq.length % size                      # free slots in the last page
        cow = int(room > 0 and num_tokens > 0 and self._refcount[seq.pages[-1]] > 1)
        return cow + -(-max(0, num_tokens - room) // size)

    def can_allocate(self, num_tokens: int, seq_id: int | None = None,
                     tokens: Sequence[int] | None = None) -> bool:
        return self.pages_needed(num_tokens, seq_id, tokens) <= len(self._free)

    # --- mutations -------------------------------------------------------------------------

    def add_sequence(self, tokens: Sequence[int] | int) -> Update:
        """A new sequence holding ``tokens`` (ids, or a count when they are unknown, which
        disables sharing). Its first full pages are shared with any live sequence that has
        the same token prefix; ``Update.start`` says how many tokens are already cached."""
        ids = None if isinstance(tokens, (int, np.integer)) else [int(t) for t in tokens]
        n = int(tokens) if ids is None else len(ids)
        if n < 0:
            raise ValueError(f"tokens={tokens!r} must be token ids or a count >= 0.")
        shared = self._match_prefix(ids) if ids is not None else []
        need = -(-n // self.page_size) - len(shared)
        self._reserve(need, f"a new sequence of {n} tokens")
        for page in shared:
            self._refcount[page] += 1
        seq_id, self._next_id = self._next_id, self._next_id + 1
        self._seqs[seq_id] = _Sequence(pages=list(shared), length=len(shared) * self.page_size,
                                       tokens=ids[:len(shared) * self.page_size]
                                       if ids is not None else None)
        rest = ids[len(shared) * self.page_size:] if ids is not None else n
        return self._extend(seq_id, rest, copies=())

    def append(self, seq_id: int, tokens: Sequence[int] | int) -> Update:
        """Appends token ids (or a count of unknown tokens) to ``seq_id``, allocating pages
        on demand and copying a shared last page first (copy-on-write)."""
        seq = self._seq(seq_id)
        ids = None if isinstance(tokens, (int, np.integer)) else [int(t) for t in tokens]
        n = int(tokens) if ids is None else len(ids)
        if n < 0:
            raise ValueError(f"tokens={tokens!r} must be token ids or a count >= 0.")
        self._reserve(self.pages_needed(n, seq_id), f"appending {n} tokens to sequence "
                      f"{seq_id}")
        copies = ()
        if seq.length % self.page_size and n and self._refcount[seq.pages[-1]] > 1:
            src = seq.pages[-1]
            dst = self._allocate()
            self._release(src)
            seq.pages[-1] = dst
            copies = ((src, dst),)
        return self._extend(seq_id, ids if ids is not None else n, copies)

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every page (and the length) of ``seq_id``."""
        seq = self._seq(seq_id)
        for page in seq.pages:
            self._refcount[page] += 1
        child, self._next_id = self._next_id, self._next_id + 1
        self._seqs[child] = _Sequence(pages=list(seq.pages), length=seq.length,
                                      tokens=None if seq.tokens is None else list(seq.tokens))
        return child

    def free(self, seq_id: int) -> None:
        """Drops the sequence; pages nobody else holds return to the free list."""
        seq = self._seq(seq_id)
        for page in seq.pages:
            self._release(page)
        del self._seqs[seq_id]

    # --- internals -------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"seq_id={seq_id!r} is not a live sequence (live: "
                           f"{sorted(self._seqs)[:8]}...).") from None

    def _reserve(self, need: int, what: str) -> None:
        if need > len(self._free):
            raise OutOfPages(f"{what} needs {need} free pages but {len(self._free)} of "
                             f"{self.num_pages} are free; free a sequence or let the request "
                             "wait (check can_allocate first).")

    def _allocate(self) -> int:
        page = self._free.pop()
        self._refcount[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            self._sealed.discard(page)
            key = self._key_of.pop(page, None)
            if key is not None:
                del self._prefix[key]
            self._free.append(page)

    def _match_prefix(self, ids: Sequence[int] | None) -> list[int]:
        """Physical pages holding the longest registered run of ``ids``' full pages."""
        if not self.prefix_sharing or ids is None:
            return []
        pages, parent, size = [], -1, self.page_size
        for start in range(0, len(ids) - size + 1, size):
            page = self._prefix.get((parent, tuple(ids[start:start + size])))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def _register(self, seq: _Sequence, index: int) -> None:
        """Makes full page ``index`` of ``seq`` findable by later sequences."""
        if not self.prefix_sharing or seq.tokens is None:
            return
        page, size = seq.pages[index], self.page_size
        if page in self._key_of:
            return
        parent = seq.pages[index - 1] if index else -1
        key = (parent, tuple(seq.tokens[index * size:(index + 1) * size]))
        if key not in self._prefix:  # an identical page already registered stays the one
            self._prefix[key] = page
            self._key_of[page] = key

    def _extend(self, seq_id: int, tokens: list[int] | int,
                copies: tuple[tuple[int, int], ...]) -> Update:
        """Writes ``tokens`` after the sequence's end into pages it owns (room reserved)."""
        seq, size = self._seqs[seq_id], self.page_size
        n = tokens if isinstance(tokens, int) else len(tokens)
        start = seq.length
        if isinstance(tokens, int):
            seq.tokens = None
        elif seq.tokens is not None:
            seq.tokens.extend(tokens)
        positions = np.arange(start, start + n)
        while len(seq.pages) * size < start + n:
            seq.pages.append(self._allocate())
        seq.length = start + n
        slots = np.asarray(seq.pages, np.int64)[positions // size] * size + positions % size
        sealed = tuple(seq.pages[index] for index in range(start // size, seq.length // size))
        self._sealed.update(sealed)
        for index in range(start // size, seq.length // size):  # pages this call filled
            self._register(seq, index)
        return Update(seq_id=seq_id, copies=copies, start=start, slots=slots.astype(np.int32),
                      sealed=sealed)


# --- device side -------------------------------------------------------------------------------

def copy_pages(k_pages: jax.Array, v_pages: jax.Array,
               copies: Iterable[tuple[int, int]]) -> tuple[jax.Array, jax.Array]:
    """Performs ``(src_page, dst_page)`` copies on ``[K, P, L, H]`` pools (copy-on-write).

    The copies of one call must be independent (no destination is also a source), as those
    of one ``Update`` are; pad a batch with ``(p, p)`` pairs to keep its shape fixed.
    """
    copies = np.asarray(list(copies), np.int32).reshape(-1, 2)
    if not copies.size:
        return k_pages, v_pages
    bad = np.argwhere((copies < 0) | (copies >= k_pages.shape[1]))
    if bad.size:  # a gather would clamp or wrap it onto another sequence's page
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"copies[{i}]={tuple(int(x) for x in copies[i])}: its "
                         f"{('src', 'dst')[j]} page {int(copies[i, j])} is not in [0, "
                         f"k_pages.shape[1]={k_pages.shape[1]}); copy between pages of the pool.")
    return copy_page_pairs(k_pages, v_pages, jnp.asarray(copies[:, 0]),
                           jnp.asarray(copies[:, 1]))


def write_kv(k_pages: jax.Array, v_pages: jax.Array, slots: jax.Array, k_new: jax.Array,
             v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatters new keys/values into the pools: ``k_new``/``v_new`` ``[..., K, H]`` go to the
    flat slots ``slots [...]`` (``page * L + offset``); negative slots (bucket padding) are
    dropped. Traceable; donate the pools under ``jit`` to update them in place."""
    kh, p, page, h = k_pages.shape
    slots = jnp.asarray(slots, jnp.int32).reshape(-1)
    slots = jnp.where(slots < 0, p * page, slots)  # out of range: dropped below

    def write(pages, new):  # new [..., K, H] -> [K, tokens, H], scattered per head
        new = jnp.moveaxis(new.reshape(-1, kh, h), 1, 0).astype(pages.dtype)
        flat = pages.reshape(kh, p * page, h).at[:, slots].set(new, mode="drop")
        return flat.reshape(pages.shape)

    return write(k_pages, k_new), write(v_pages, v_new)
