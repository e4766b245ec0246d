"""A new attention backend in one file: query-chunked softmax attention in plain jnp.

``chunked_attention`` computes softmax attention one chunk of ``CHUNK`` queries at a time
(``lax.map``), so the logits never exceed ``[B, N, CHUNK, S]`` (Rabe & Staats, 2021, without
their key chunking). ``Chunked`` is the backend: its one method, ``dense``, takes the typed
call record (``tx.attention.calls.Dense``) and declines (``Decline``) what it does not serve:
a length that is no multiple of ``CHUNK``, or a score modifier (ALiBi, T5 buckets), which
the next backend of the order (``xla``) then serves. It is registered as ``mine``, a name the
``implementation`` flag then accepts:

  python experiments/train.py --config=examples/extending/my_attention.py \
      --workdir=/tmp/tx/mine --config.model.implementation=mine,xla \
      --config.model.positions=alibi
"""

import jax
import jax.numpy as jnp
from jax import lax

from tx.kernels import checks, reference
from tx import attention, flags
from tx.train.configs import experiment

CHUNK = 16


def chunked_attention(q, k, v, *, mask=None, segment_ids=None, kv_lengths=None, bias=None,
                      scale=None, q_positions=None, kv_positions=None):
    b, t, s, n, kh, h = checks.check_qkv(q, k, v)
    if t % CHUNK:
        raise attention.Decline(f"{t} queries are not a multiple of CHUNK={CHUNK}")
    mask = checks.check_mask(mask)
    scale = h ** -0.5 if scale is None else scale
    if q_positions is None:  # bottom-right aligned, as every implementation
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)  # GQA: [B, S, N, H]

    def one_chunk(start):
        rows = lambda x, axis=1: lax.dynamic_slice_in_dim(x, start, CHUNK, axis=axis)
        segments = None if segment_ids is None else (rows(segment_ids[0]), segment_ids[1])
        visible = reference.visibility(mask, b, CHUNK, s, segment_ids=segments,
                                       kv_lengths=kv_lengths, q_positions=rows(q_positions),
                                       kv_positions=kv_positions)[:, None]  # [B, 1, C, S]
        logits = jnp.einsum("BCNH,BSNH->BNCS", rows(q), k,
                            preferred_element_type=jnp.float32) * scale
        if bias is not None:
            logits = logits + rows(bias, axis=2).astype(jnp.float32)
        logits = jnp.where(visible, logits, -1e30)
        # Rows that see nothing get zeros: their uniform softmax is multiplied by 0.
        probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1), 0.0)
        return jnp.einsum("BNCS,BSNH->BCNH", probs.astype(v.dtype), v,
                          preferred_element_type=jnp.float32)

    out = lax.map(one_chunk, jnp.arange(0, t, CHUNK))  # [T / C, B, C, N, H]
    return out.transpose(1, 0, 2, 3, 4).reshape(b, t, n, h).astype(q.dtype)


class Chunked(attention.Backend):
    name = "mine"

    def dense(self, call: attention.calls.Dense):
        if call.score_mod is not None:
            raise attention.Decline(f"no score modifiers ({type(call.score_mod).__name__})")
        kwargs = {k: v for k, v in call.kwargs().items() if k != "score_mod"}
        return chunked_attention(call.q, call.k, call.v, **kwargs)


attention.register(Chunked())


def get_config():
    # MQAR with GQA; "xla" serves the calls `mine` declines (a length not a multiple of 16).
    model = flags.ModelFlags(task="lm", vocab_size=40, d_model=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, d_ff=128, implementation=("mine", "xla"))
    return experiment(model, dataset="mqar", seq_len=48, extensions=[__file__],
                      options=dict(num_kv_pairs=4, num_keys=8, num_values=8), steps=400,
                      batch_size=64, warmup_steps=30, weight_decay=0.0, log_every=20,
                      eval_every=100, eval_batches=4, checkpoint_every=200)
