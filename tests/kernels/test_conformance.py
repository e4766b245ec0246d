"""Every registered attention implementation against the one conformance suite
(``tests/attention_suite.py``)."""

import pytest

pytest.register_assert_rewrite("tests.attention_suite")  # detailed messages from its asserts

from kernels import masks  # noqa: E402
from tests.attention_suite import CATALOGUE, AttentionSuite, Case  # noqa: E402


class TestXla(AttentionSuite):
    """The reference's own code, run op by op (each op compiles once per shape): compiling
    every case would cost most of this file's time."""

    implementation = "xla"
    must_serve_core = True
    jit = False


class TestPallas(AttentionSuite):
    """The Pallas interpreter on CPU, the compiled Triton kernels on a GPU."""

    implementation = "pallas"
    must_serve_core = True


class TestCpu(AttentionSuite):
    """The fused C++ kernel (``kernels/cpu_attention.cc``): every core case; it declines a
    bias (left to xla)."""

    implementation = "cpu"
    must_serve_core = True


class TestCudnn(AttentionSuite):
    """Declines (skips) everything without a GPU, and fp32, segment ids and most masks on
    one."""

    implementation = "cudnn"
    dtype = "bfloat16"


def _leaf_kinds(mask):
    if isinstance(mask, (masks.And, masks.Or)):
        return {type(mask)} | _leaf_kinds(mask.a) | _leaf_kinds(mask.b)
    return {type(mask)}


def test_catalogue_has_every_mask_kind():
    kinds = {value for value in vars(masks).values()
             if isinstance(value, type) and issubclass(value, masks.Mask)
             and value is not masks.Mask}
    covered = set().union(*(_leaf_kinds(mask) for mask in CATALOGUE.values()))
    assert kinds <= covered, f"add to the catalogue: {kinds - covered}"


def _declines_everything(q, k, v, **kwargs):
    raise NotImplementedError("not today")


class _Declining(AttentionSuite):
    implementation = _declines_everything


def test_declined_core_case_fails_only_where_it_must_be_served():
    core, extra = Case("causal"), Case("causal", bias=True)
    with pytest.raises(pytest.skip.Exception, match="not today"):
        _Declining().forward(core)
    required = type("Required", (_Declining,), {"must_serve_core": True})()
    with pytest.raises(pytest.fail.Exception, match="must serve every core case"):
        required.value_and_grads(core)
    with pytest.raises(pytest.skip.Exception, match="not today"):
        required.forward(extra)
    up_front = type("UpFront", (AttentionSuite,), {
        "implementation": "xla", "must_serve_core": True,
        "supports": lambda self, case: None if case.core else "no bias here"})()
    with pytest.raises(pytest.skip.Exception, match="no bias here"):
        up_front.forward(extra)
