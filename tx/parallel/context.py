"""Context parallelism in a model: softmax attention on a sequence split over the mesh's
``context`` axis, as a ring (``tx.parallel.ring``) or by all-to-all
(``tx.parallel.ulysses``), chosen by ``mesh.context_attention``.

The attention layer's no-cache path (training, scoring, encoders, prefill without a cache)
calls :func:`attend` when the active mesh has ``context > 1``; everything else in a block
(projections, MLP, norms) is per token, and its activations are constrained to the same
sequence split (``tx.parallel.shard.constrain``), so no device holds a whole sequence's
activations. Layers whose mixing is not softmax attention (FAVOR+, FNet, the linear and
memory variants) are refused by name before anything compiles (:func:`check_model`).
"""

from __future__ import annotations

import jax

from tx.parallel import ring, ulysses
from tx.parallel.shard import Parallel


def _axes(parallel: Parallel, q, k):
    """(batch axes, head axis) of q ``[B, T, N, H]`` / k under ``parallel``'s rules."""
    q_spec = parallel.spec(("batch", None, "heads", None), q.shape)
    kv_spec = parallel.spec(("batch", None, "kv_heads", None), k.shape)
    if q_spec[2] != kv_spec[2] and k.shape[2] != 1:
        raise ValueError(f"mesh.tensor splits {q.shape[2]} query heads but not {k.shape[2]} "
                         "K/V heads; make mesh.tensor divide num_kv_heads.")
    return q_spec[0], q_spec[2]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, parallel: Parallel, mask=None,
           segment_ids=None, kv_lengths=None, scale=None, score_mod=None, bias=None,
           implementation=()) -> jax.Array:
    """Dense attention ``[B, T, N, H]`` with T (and S) split over the context axis."""
    if bias is not None:
        raise ValueError("a dense logits bias [B, N, T, S] (positions.bias) cannot be split "
                         f"over mesh.context={parallel.context}; use a position scheme with a "
                         "score modifier (t5, alibi, rope), or mesh.context=1.")
    batch_axes, head_axis = _axes(parallel, q, k)
    kwargs = dict(mesh=parallel.mesh, mask=mask, segment_ids=segment_ids,
                  kv_lengths=kv_lengths, scale=scale, score_mod=score_mod,
                  batch_axes=batch_axes, head_axis=head_axis)
    if parallel.context_attention == "all_to_all":
        return ulysses.all_to_all_attention(q, k, v, implementation=implementation, **kwargs)
    return ring.ring_attention(q, k, v, implementation=implementation, **kwargs)


def unshardable(model) -> list[str]:
    """Paths of the layers in ``model`` whose sequence mixing cannot be split over the
    context axis: any attention slot that is not the softmax ``Attention`` path."""
    from flax import nnx  # noqa: PLC0415

    out = []
    for path, node in nnx.iter_graph(model):
        if not hasattr(type(node), "pageable"):  # not an attention slot
            continue
        # The softmax path is ``Attention._attend``, which reaches the context-parallel
        # attention; a slot that replaces it (or has none) mixes the sequence its own way.
        # Named, not imported: tx.attention.layer imports the cache that imports us.
        attend = getattr(type(node), "_attend", None)
        if getattr(attend, "__qualname__", None) != _SOFTMAX_PATH:
            out.append(f"{'/'.join(map(str, path))} ({type(node).__name__})")
    return out


_SOFTMAX_PATH = "Attention._attend"


def check_model(model, parallel: Parallel | None) -> None:
    """Refuses a model with layers that cannot run on a split sequence (at trace time,
    before compiling)."""
    if parallel is None or parallel.context == 1:
        return
    bad = unshardable(model)
    if bad:
        raise ValueError(
            f"mesh.context={parallel.context} splits the sequence, but these layers mix it "
            f"by other means than softmax attention and cannot be split: {', '.join(bad)}; "
            "use mesh.context=1 for this model (or softmax layers only).")
