"""Every registered attention backend against the one conformance suite (``tx.testing``): each
path a backend offers, its cases against the reference."""

import dataclasses

import jax.numpy as jnp
import pytest

pytest.register_assert_rewrite("tx.testing")  # detailed messages from its asserts

from tx.kernels import masks, reference  # noqa: E402
from tx import testing  # noqa: E402
from tx.attention import Backend, Decline, registry  # noqa: E402


class TestXla(testing.BackendSuite):
    """The reference's own code, run op by op (each op compiles once per shape): compiling
    every dense and paged case would cost most of this class's time."""

    backend = "xla"
    must_serve = ("dense", "paged", "linear", "gated")
    must_serve_optional = tuple(testing.OPTIONAL)
    jit = ("linear", "gated")  # chunked scans: op by op, they would compile on every call


class TestPallas(testing.BackendSuite):
    """The Pallas interpreter on CPU, the compiled Triton kernels on a GPU. It declines a
    dense bias (a score modifier is its form) and bidirectional linear attention."""

    backend = "pallas"
    must_serve = ("dense", "cached", "paged", "linear", "gated")
    must_serve_optional = ("score_mod", "int8", "unbanded", "value_head_dim")


class TestCpu(testing.BackendSuite):
    """The fused C++ kernel (``kernels/cpu_attention.cc``): every core case of its paths; it
    declines a bias, score modifiers, int8 pages and masks that are no band over a cache
    (left to xla)."""

    backend = "cpu"
    must_serve = ("dense", "cached", "paged", "paged_write")
    must_serve_optional = ("value_head_dim",)


class TestCudnn(testing.BackendSuite):
    """Declines (skips) everything without a GPU, and fp32, segment ids, modifiers and most
    masks on one."""

    backend = "cudnn"


def _leaf_kinds(mask):
    if isinstance(mask, (masks.And, masks.Or)):
        return {type(mask)} | _leaf_kinds(mask.a) | _leaf_kinds(mask.b)
    return {type(mask)}


def test_catalogue_has_every_mask_kind_and_a_user_mask():
    kinds = {value for value in vars(masks).values()
             if isinstance(value, type) and issubclass(value, masks.Mask)
             and value is not masks.Mask}
    covered = set().union(*(_leaf_kinds(mask) for mask in testing.CATALOGUE.values()))
    assert kinds <= covered, f"add to the catalogue: {kinds - covered}"
    assert covered - kinds, "the catalogue has no mask class of its own (a user's)"


@pytest.mark.parametrize("path", list(testing.FACTORS))
def test_cases_cover_every_pair_of_factor_values(path):
    cases = testing.CASES[path]
    assert not testing.uncovered_pairs(testing.FACTORS[path], cases)
    assert len({c.id for c in cases}) == len(cases), "test ids repeat"


def test_pairwise_is_much_smaller_than_the_product():
    factors = {"a": range(10), "b": range(6), "c": range(3), "d": range(2), "e": range(4)}
    rows = testing.pairwise(factors)
    assert not testing.uncovered_pairs(factors, rows)
    assert 60 <= len(rows) <= 70


class _Declining(Backend):
    """Declines score modifiers (``everything``: every call) and serves the rest as xla."""

    name = "declining"

    def __init__(self, everything: bool):
        self.everything = everything

    def dense(self, call):
        if self.everything or call.score_mod is not None:
            raise Decline("not today")
        return reference.attention(call.q, call.k, call.v, **call.kwargs())

    def paged(self, call):
        raise Decline("not today")


def _suite(backend, **attrs):
    return type("Suite", (testing.BackendSuite,), {"backend": backend, **attrs})()


def test_declined_core_case_fails_only_where_it_must_be_served():
    core, with_mod = testing.DenseCase("causal"), testing.DenseCase("causal", mod="alibi")
    with pytest.raises(pytest.skip.Exception, match="not today"):
        _suite(_Declining(everything=True)).check_dense(core)
    required = dict(must_serve=("dense",))
    with pytest.raises(pytest.fail.Exception, match="must serve the core dense cases"):
        _suite(_Declining(everything=True), **required).check_dense(core)
    # A modifier is optional: the case is checked without it, then skipped ...
    with pytest.raises(pytest.skip.Exception, match=r"not today \(checked without score_mod"):
        _suite(_Declining(everything=False), **required).check_dense(with_mod)
    # ... and fails where the case without it is declined too,
    with pytest.raises(pytest.fail.Exception, match="causal-g1-f32-13x13: not today"):
        _suite(_Declining(everything=True), **required).check_dense(with_mod)
    # or where modifiers must be served.
    with pytest.raises(pytest.fail.Exception, match="must serve"):
        _suite(_Declining(everything=False), must_serve=("dense",),
               must_serve_optional=("score_mod",)).check_dense(with_mod)
    with pytest.raises(pytest.skip.Exception, match="not today"):  # paged: not must_serve
        _suite(_Declining(everything=True), **required).check_paged(testing.CASES["paged"][0])
    up_front = _suite("xla", supports=lambda self, case: "no bias here" if case.extras()
                      else None, **required)
    with pytest.raises(pytest.skip.Exception, match="no bias here"):
        up_front.check_dense(testing.DenseCase("causal", bias=True))


def test_a_wrong_backend_fails():
    """The suite is not vacuous: a backend that drops the modifier, or reads a poisoned
    page, fails its cases."""

    class Forgetful(Backend):
        name = "forgetful"

        def dense(self, call):
            return reference.attention(call.q, call.k, call.v,
                                       **dataclasses.replace(call, score_mod=None).kwargs())

        def paged(self, call):  # every row reads page 0
            return reference.paged_attention(call.q, call.k_pages, call.v_pages,
                                             jnp.zeros_like(call.block_tables), call.lengths,
                                             mask=call.mask)

    suite = _suite(Forgetful(), jit=False)
    with pytest.raises(AssertionError, match="out"):
        suite.check_dense(testing.DenseCase("causal", mod="alibi"))
    with pytest.raises(AssertionError):
        suite.check_paged(testing.PagedCase("causal"))


def test_a_wrong_recurrence_fails():
    """The gated cases are not vacuous: a backend that carries the state across documents, or
    lets padded positions write, fails them."""

    class Leaky(Backend):
        name = "leaky"

        def __init__(self, drop):
            self.drop = drop

        def gated(self, call):
            return registry.resolve(("xla",))[0].gated(
                dataclasses.replace(call, **{self.drop: None}))

    packed = testing.GatedCase("scalar", data="packed")
    empty = testing.GatedCase("channel", data="empty")
    with pytest.raises(AssertionError, match="out"):
        _suite(Leaky("segment_ids")).check_gated(packed)
    with pytest.raises(AssertionError, match="out"):
        _suite(Leaky("kv_lengths")).check_gated(empty)
