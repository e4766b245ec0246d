"""tx.inference.paged_cache: the page pool's invariants under random operation sequences
(hypothesis stateful testing), and the device helpers against the decode reference.

The state machine drives a ``PagePool`` with a physical *token store* ``[P, L]`` standing in
for the K/V pools: every ``Update`` is applied to it (copies, then writes of the new tokens'
ids into their slots), exactly as the device would apply it to K/V. After every step each
sequence, read through its block table, must show exactly the tokens it was given.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant,
                                 multiple, rule)

from tx.kernels import masks as M
from tx.kernels import reference
from tx.inference.paged_cache import OutOfPages, PagePool, copy_pages, write_kv

NUM_PAGES, PAGE = 12, 4
# A small alphabet and a fixed "system prompt" make prefix collisions (sharing) common.
SYSTEM = [7, 7, 1, 2, 3, 4, 5, 6, 9]
tokens_st = st.lists(st.integers(0, 3), max_size=10)


class PoolMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.pool = PagePool(NUM_PAGES, PAGE)
        self.store = np.full((NUM_PAGES, PAGE), -1, np.int64)  # token id in each slot
        self.expected: dict[int, list[int]] = {}  # what each sequence appended
        self.family: dict[int, int] = {}  # fork family (root sequence id)
        self.sealed: set[int] = set()  # pages some update sealed (quantised once, immutable)

    def _apply(self, update, new_tokens):
        """What the device does: copy pages, then write the new tokens into their slots.
        Sealed pages are immutable: never written, never copied from (they are shared)."""
        for src, dst in update.copies:
            assert self.pool.refcount(dst) == 1 and dst != src
            assert src not in self.sealed and dst not in self.sealed
            self.store[dst] = self.store[src]
        assert len(update.slots) == len(new_tokens)
        assert not {int(s) // PAGE for s in update.slots} & self.sealed
        self.store.reshape(-1)[update.slots] = new_tokens
        assert not set(update.sealed) & self.sealed, "a page was sealed twice"
        self.sealed.update(update.sealed)

    def _snapshot(self):
        return {s: (self.pool.pages(s), self.pool.length(s)) for s in self.pool.seq_ids}, \
            self.pool.num_free_pages

    @rule(target=seqs, prefix=st.booleans(), tokens=tokens_st)
    def add(self, prefix, tokens):
        tokens = (SYSTEM if prefix else []) + tokens
        before = self._snapshot()
        fits = self.pool.can_allocate(len(tokens), tokens=tokens)
        try:
            update = self.pool.add_sequence(tokens)
        except OutOfPages:
            assert not fits and self._snapshot() == before
            return multiple()
        assert fits
        self._apply(update, tokens[update.start:])  # the shared prefix is already stored
        self.expected[update.seq_id] = list(tokens)
        self.family[update.seq_id] = update.seq_id
        return update.seq_id

    @rule(seq=seqs, tokens=tokens_st, as_count=st.booleans())
    def append(self, seq, tokens, as_count):
        if seq not in self.expected:
            return
        before = self._snapshot()
        fits = self.pool.can_allocate(len(tokens), seq)
        try:
            update = self.pool.append(seq, len(tokens) if as_count else tokens)
        except OutOfPages:
            assert not fits and self._snapshot() == before
            return
        assert fits and update.start == len(self.expected[seq])
        self._apply(update, tokens)
        self.expected[seq] += tokens

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.expected:
            return multiple()
        child = self.pool.fork(seq)
        self.expected[child] = list(self.expected[seq])
        self.family[child] = self.family[seq]
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.expected:
            return
        self.pool.free(seq)
        del self.expected[seq]
        self.sealed = {p for p in self.sealed if self.pool.refcount(p)}  # freed pages unseal

    @invariant()
    def sealed_pages_are_the_full_ones(self):
        for seq in self.expected:
            for index, page in enumerate(self.pool.pages(seq)):
                full = (index + 1) * PAGE <= self.pool.length(seq)
                assert (page in self.sealed) == full == self.pool.is_sealed(page), (seq, index)

    @invariant()
    def contents_match(self):
        for seq, tokens in self.expected.items():
            assert self.pool.length(seq) == len(tokens)
            table = self.pool.block_table([seq])[0]
            seen = self.store[table].reshape(-1)[:len(tokens)]
            assert seen.tolist() == tokens, f"sequence {seq} sees {seen} not {tokens}"

    @invariant()
    def refcounts_and_sharing(self):
        holders: dict[int, list[tuple[int, int]]] = {}
        for seq in self.expected:
            pages = self.pool.pages(seq)
            assert len(set(pages)) == len(pages)
            assert len(pages) == -(-self.pool.length(seq) // PAGE)
            for index, page in enumerate(pages):
                holders.setdefault(page, []).append((seq, index))
        for page in range(NUM_PAGES):
            assert self.pool.refcount(page) == len(holders.get(page, []))
        for page, held in holders.items():
            if len(held) < 2:
                continue
            # Shared pages sit at one logical index; a partly filled one only among forks.
            assert len({index for _, index in held}) == 1
            index = held[0][1]
            partial = [s for s, _ in held if self.pool.length(s) < (index + 1) * PAGE]
            if partial:
                assert len({self.family[s] for s, _ in held}) == 1, held

    @invariant()
    def free_list_is_exact(self):
        used = {p for seq in self.expected for p in self.pool.pages(seq)}
        assert self.pool.num_free_pages + len(used) == NUM_PAGES
        assert sorted(self.pool._free) == sorted(set(range(NUM_PAGES)) - used)

    def teardown(self):
        for seq in list(self.expected):
            self.pool.free(seq)
        assert self.pool.num_free_pages == NUM_PAGES
        assert all(self.pool.refcount(p) == 0 for p in range(NUM_PAGES))


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase


# --- targeted cases ----------------------------------------------------------------------------

def test_prefix_sharing_stores_a_shared_prompt_once():
    pool = PagePool(64, 16)
    prompt = list(range(100, 164))  # 4 full pages
    first = pool.add_sequence(prompt + [1, 2, 3])
    second = pool.add_sequence(prompt + [4, 5])
    assert first.start == 0 and second.start == 64 and len(second.slots) == 2
    assert pool.pages(0)[:4] == pool.pages(1)[:4]
    assert pool.pages(0)[4] != pool.pages(1)[4]
    assert all(pool.refcount(p) == 2 for p in pool.pages(0)[:4])
    assert pool.num_free_pages == 64 - 6
    pool.free(0)
    assert all(pool.refcount(p) == 1 for p in pool.pages(1)[:4])
    pool.free(1)
    assert pool.num_free_pages == 64


def test_generated_full_pages_become_shareable():
    pool = PagePool(8, 4)
    pool.add_sequence([1, 2])
    pool.append(0, [3, 4, 5])  # page 0 is now full: [1, 2, 3, 4]
    update = pool.add_sequence([1, 2, 3, 4, 9])
    assert update.start == 4 and pool.pages(1)[0] == pool.pages(0)[0]


def test_fork_mid_page_copies_on_write():
    pool = PagePool(8, 4)
    pool.add_sequence([1, 2, 3, 4, 5, 6])  # pages: full, half
    child = pool.fork(0)
    assert pool.pages(child) == pool.pages(0)
    shared_last = pool.pages(0)[1]
    update = pool.append(child, [7])
    assert update.copies == ((shared_last, pool.pages(child)[1]),)
    assert pool.pages(child)[0] == pool.pages(0)[0]  # the full page stays shared
    assert pool.refcount(shared_last) == 1
    assert pool.append(0, [8]).copies == ()  # the parent's page is private again


def test_out_of_pages_leaves_the_pool_unchanged():
    pool = PagePool(3, 4)
    pool.add_sequence(list(range(10)))  # 3 pages
    assert not pool.can_allocate(3, 0) and pool.can_allocate(2, 0)
    with pytest.raises(OutOfPages, match="needs 1 free pages but 0"):
        pool.append(0, [1, 2, 3])
    with pytest.raises(OutOfPages):
        pool.add_sequence([1])
    assert pool.length(0) == 10 and pool.num_free_pages == 0
    pool.append(0, [1, 2])
    assert pool.length(0) == 12


def test_block_table_and_lengths():
    pool = PagePool(10, 4)
    pool.add_sequence(list(range(9)))
    pool.add_sequence([1])
    table = pool.block_table([0, 1], width=4, pad=-1)
    assert table.dtype == np.int32 and table.shape == (2, 4)
    assert table[1, 1:].tolist() == [-1, -1, -1]
    assert pool.lengths([0, 1]).tolist() == [9, 1]
    with pytest.raises(ValueError, match="width=2"):
        pool.block_table([0], width=2)
    with pytest.raises(KeyError, match="seq_id=5"):
        pool.append(5, [1])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_device_pools_match_contiguous_attention(seed):
    """Prefill, fork, decode through write_kv/copy_pages; the paged reference equals dense
    attention over each sequence's own K/V."""
    rng = np.random.default_rng(seed)
    kh, h, page = 2, 8, 4
    pool = PagePool(16, page)
    k_pages = jnp.zeros((kh, 16, page, h))
    v_pages = jnp.zeros((kh, 16, page, h))
    dense_k: dict[int, np.ndarray] = {}
    dense_v: dict[int, np.ndarray] = {}

    def feed(update, k_all, v_all):
        nonlocal k_pages, v_pages
        k_pages, v_pages = copy_pages(k_pages, v_pages, update.copies)
        k_pages, v_pages = write_kv(k_pages, v_pages, update.slots, k_all[update.start:],
                                    v_all[update.start:])

    prompt = rng.integers(0, 5, 6).tolist()
    kv = rng.standard_normal((2, 6, kh, h)).astype(np.float32)
    feed(pool.add_sequence(prompt), *kv)
    dense_k[0], dense_v[0] = kv[0], kv[1]
    child = pool.fork(0)
    dense_k[child], dense_v[child] = kv[0], kv[1]
    for _ in range(3):
        for seq in (0, child):
            new = rng.standard_normal((2, 1, kh, h)).astype(np.float32)
            update = pool.append(seq, [int(rng.integers(0, 5))])
            feed(update, np.concatenate([dense_k[seq], new[0]]),
                 np.concatenate([dense_v[seq], new[1]]))
            dense_k[seq] = np.concatenate([dense_k[seq], new[0]])
            dense_v[seq] = np.concatenate([dense_v[seq], new[1]])
    # Padded slots (-1) are dropped, not written to the last slot.
    k_before = k_pages
    k_pages, v_pages = write_kv(k_pages, v_pages, np.array([-1]), jnp.ones((1, kh, h)),
                                jnp.ones((1, kh, h)))
    np.testing.assert_array_equal(np.asarray(k_pages), np.asarray(k_before))

    seqs = [0, child]
    q = jnp.asarray(rng.standard_normal((2, 4, h)), jnp.float32)
    got = reference.paged_attention(q, k_pages, v_pages, jnp.asarray(pool.block_table(seqs, 4)),
                                    jnp.asarray(pool.lengths(seqs)), mask=M.Causal())
    for row, seq in enumerate(seqs):
        want = reference.attention(q[row][None, None], jnp.asarray(dense_k[seq])[None],
                                   jnp.asarray(dense_v[seq])[None], mask=M.Causal())
        np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want[0, 0]), atol=1e-5)
