"""DeBERTa's disentangled attention as a position scheme (``positions=deberta``).

DeBERTa (He et al., 2021, arXiv:2006.03654; v2/v3's log buckets and shared projections) keeps
no absolute positions. Every self-attention logit of query ``i`` and key ``j`` gains two terms:

* content-to-position: ``q_i . k_r`` with ``k_r`` the layer's key projection of the relative
  embedding of ``r = idx(i, j)``;
* position-to-content: ``k_j . q_r`` with ``q_r`` the layer's query projection of it;

``idx`` the clipped log bucket of ``i - j`` (``kernels.row_tables.relative_index``), and the
logits scaled by ``1 / sqrt(H * (1 + terms))``. The relative embeddings ``[2 span, D]`` and
their LayerNorm belong to the tower (shared by the layers, as in HF's encoder); each layer
projects them with its own q/k weights (``share_att_key``). The terms become per-row and
per-column tables ``[B, T, N, 2 span]`` that the kernels look up
(``kernels.row_tables.Disentangled``): no ``[T, S]`` bias, flash forward and backward.

Dense self-attention only: a decoding cache and cross-attention are refused by name.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from tx.kernels import row_tables
from tx.layers import positions as positions_lib
from tx.layers.norms import make_norm
from tx.registry import Field


class DisentangledPositions(positions_lib.Positions):
    """The tower's relative embeddings ``rel_rd [2 span, D]`` and their LayerNorm; builds each
    layer's ``row_tables.Disentangled`` from that layer's q, k and projections."""

    def __init__(self, d_model: int, *, position_buckets: int, max_relative_positions: int,
                 terms: tuple[str, ...], eps: float, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        span = position_buckets if position_buckets > 0 else max_relative_positions
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=0.02), (None, "embed"),
                                     eager_sharding=False)
        self.rel_rd = nnx.Param(init(rngs.params(), (2 * span, d_model), param_dtype))
        self.norm = make_norm("layernorm", d_model, eps=eps, rngs=rngs)
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative_positions
        self.terms = tuple(terms)

    def qk_score_mod(self, q_btnh, k_bskh, attn) -> row_tables.Disentangled:
        if attn.cache is not None:
            raise ValueError("positions=deberta: a decoding cache is set on this attention "
                             "layer, but DeBERTa's tables index whole sequences (an encoder); "
                             "drop the cache (tower.drop_cache()) and attend over the sequence.")
        b, t, n, h = q_btnh.shape
        s, kh = k_bskh.shape[1:3]
        f32 = jnp.float32
        rel = self.norm(self.rel_rd[...].astype(f32)).astype(f32)              # [R, D]
        r = rel.shape[0]
        content_scale = (1 + len(self.terms)) ** -0.5
        scale = (h ** -0.5 if attn.scale is None else attn.scale) * content_scale

        def project(w, bias):  # the layer's own projection of the relative embeddings
            out = jnp.einsum("RD,DNH->RNH", rel, w[...].astype(f32))
            return out if bias is None else out + bias[...].astype(f32)[None]

        c2p = p2c = None
        if "c2p" in self.terms:
            pos_k = project(attn.k_dkh, attn.k_bias_kh)                          # [R, K, H]
            c2p = jnp.einsum("BTKGH,RKH->BTKGR", q_btnh.reshape(b, t, kh, n // kh, h).astype(f32),
                             pos_k).reshape(b, t, n, r) * scale
        if "p2c" in self.terms:
            pos_q = project(attn.q_dnh, attn.q_bias_nh).reshape(r, kh, n // kh, h)
            p2c = jnp.einsum("BSKH,RKGH->BSKGR", k_bskh.astype(f32),
                             pos_q).reshape(b, s, n, r) * scale
        return row_tables.Disentangled(
            c2p, p2c, position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions, content_scale=content_scale)


@dataclasses.dataclass(frozen=True)
class Deberta:
    """DeBERTa-v2/v3 relative positions: ``position_buckets`` log buckets (<= 0: none, every
    distance up to ``max_relative_positions`` its own), the ``terms`` of ``("c2p", "p2c")``
    kept. DeBERTa-v3: ``Deberta(256, 512)``."""

    position_buckets: int = 256
    max_relative_positions: int = 512
    terms: tuple = row_tables.TERMS

    def __post_init__(self):
        # One spelling per value: the terms in DeBERTa's order, however they were given.
        terms = tuple(self.terms) if isinstance(self.terms, (tuple, list)) else (self.terms,)
        if set(terms) <= set(row_tables.TERMS) and len(set(terms)) == len(terms):
            terms = tuple(t for t in row_tables.TERMS if t in terms)
        object.__setattr__(self, "terms", terms)
        if not self.terms or len(set(self.terms)) != len(self.terms) or \
                not set(self.terms) <= set(row_tables.TERMS):
            raise ValueError(f"positions.terms={self.terms!r}: give one or both of "
                             f"{row_tables.TERMS} (DeBERTa's pos_att_type), each once.")
        mr, pb = self.max_relative_positions, self.position_buckets
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 2:
            raise ValueError(f"positions.max_relative_positions={mr!r}: must be an integer "
                             ">= 2, e.g. 512.")
        if isinstance(pb, bool) or not isinstance(pb, int) or (pb > 0 and not 4 <= pb <= mr):
            raise ValueError(f"positions.position_buckets={pb!r}: must be an integer <= 0 (no "
                             f"buckets) or in [4, max_relative_positions={mr}], e.g. 256.")

    def build(self, cfg, *, causal: bool, rngs: nnx.Rngs) -> DisentangledPositions:
        return DisentangledPositions(
            cfg.d_model, position_buckets=self.position_buckets,
            max_relative_positions=self.max_relative_positions, terms=self.terms,
            eps=getattr(cfg.norm, "eps", 1e-7), rngs=rngs)


def _terms(name, value) -> str | None:
    ok = isinstance(value, (tuple, list)) and value and \
        len(set(value)) == len(value) and set(value) <= set(row_tables.TERMS)
    return None if ok else "give one or both of c2p,p2c (DeBERTa's pos_att_type)."


def _integer(name, value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else \
        "must be an integer (<= 0: no buckets), e.g. 256."


FIELDS = (Field("deberta_buckets", 256, "DeBERTa: log buckets of relative distance (<= 0: "
                "none)", check=_integer),
          Field("deberta_max_relative", 512, "DeBERTa: the distance the buckets reach",
                check=lambda n, v: None if isinstance(v, int) and not isinstance(v, bool)
                and v >= 2 else "must be an integer >= 2, e.g. 512."),
          Field("deberta_terms", row_tables.TERMS, "DeBERTa: the position terms kept, of "
                "c2p,p2c", check=_terms))

positions_lib.SCHEMES.register(
    "deberta", lambda f: Deberta(f.deberta_buckets, f.deberta_max_relative,
                                 tuple(f.deberta_terms)),
    fields=FIELDS, prints=lambda v: type(v) is Deberta and dict(
        deberta_buckets=v.position_buckets, deberta_max_relative=v.max_relative_positions,
        deberta_terms=v.terms))

__all__ = ["Deberta", "DisentangledPositions"]
