// Fused attention for the CPU: forward and backward under any mask, GQA without copying K/V,
// one (batch row, K/V head) per task on XLA's intra-op thread pool.
//
// Built on first use by kernels/cpu_attention.py (g++ -O3 -march=native) and called through
// XLA's FFI. Layouts are tx's: q/o [B, T, N, H], k/v [B, S, K, H], lse [B, N, T]; query head
// n = kh * G + g reads K/V head kh. What a row sees comes from the caller: rows [T, 2], the
// key range [j0, j1) of each row under the mask (the tiles outside it are never touched);
// kv_len [B], which cuts each batch row's range; and, where the mask is not a band or the
// batch is packed, a per-key check inside the range: visible [T, S] (the mask's dense map)
// and segment ids q_seg [B, T] / kv_seg [B, S].
//
// Why a hand-written kernel: XLA runs attention as separate dots and elementwise passes, and
// every pass streams the [rows, S] logits through memory; here each row's logits live in a
// small scratch buffer that stays in L1 while they are formed, exponentiated and used.
// Vectors, exp and the thread pool's loop are in cpu_simd.h; a row's loops in cpu_rows.h.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_rows.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace tx_cpu;  // NOLINT: the kernel's own primitives (cpu_simd.h, cpu_rows.h)

// Multiply-adds of a call's logits: what decides whether the pool's threads are worth waking.
inline int64_t work_of(const Dims& d) { return d.b * d.t * d.n * d.s * d.h; }

using I32 = ffi::Buffer<ffi::S32>;
using F32 = ffi::Buffer<ffi::F32>;

Visibility visibility_of(I32 rows, I32 kv_len, ffi::Buffer<ffi::S8> visible, I32 q_seg,
                         I32 kv_seg, int64_t dense, int64_t packed) {
  return Visibility{rows.typed_data(), kv_len.typed_data(),
                    dense ? visible.typed_data() : nullptr,
                    packed ? q_seg.typed_data() : nullptr,
                    packed ? kv_seg.typed_data() : nullptr};
}

// The forward of one task's rows over its filled panel: o, and lse unless it is null.
void attend_rows(const Dims& d, const Visibility& vis, int64_t bi, int64_t kh,
                 const Panel& panel, const float* qp, float* op, float* lp) {
  int64_t hp = panel.hp, hvp = panel.hvp, ld = panel.sp;
  std::vector<float> qs(kSlots * hp), logits(kSlots * ld), acc(kSlots * hvp);
  float m[kSlots], l[kSlots];
  for (int64_t first = 0; first < d.t * d.g; first += kSlots) {
    Group gr(d, vis, bi, kh, first);
    if (gr.u0 < gr.u1) {
      slot_queries(d, gr, qp, bi, hp, qs.data());
      slot_dots(gr, qs.data(), hp, panel.kt.data(), d.h, panel.sp, logits.data(), ld);
      if (slot_hide(d, vis, bi, gr, logits.data(), ld)) {
        for (int s = 0; s < kSlots; ++s) {
          const Slot& sl = gr.slot[s];
          m[s] = sl.empty() ? 0.0f : tx_cpu::max_of(logits.data() + s * ld, sl.j0, sl.j1);
        }
        slot_exp(gr, logits.data(), ld, m, l);
        with_vectors(hvp / kLanes, [&](auto hv) {
          slot_weighted_rows<hv()>(gr, logits.data(), ld, panel.v_rows.data(), hvp,
                                   acc.data());
        });
      }
    }
    for (int s = 0; s < kSlots; ++s) {
      const Slot& sl = gr.slot[s];
      if (!sl.real) continue;
      float* out = op + row_at(d, bi, sl, d.hv);
      float* row_lse = lp == nullptr ? nullptr : lp + (bi * d.n + sl.n) * d.t + sl.i;
      if (sl.empty()) {  // sees no key: zeros, and an lse the backward reads as "skip"
        std::fill(out, out + d.hv, 0.0f);
        if (row_lse != nullptr) *row_lse = std::numeric_limits<float>::infinity();
        continue;
      }
      for (int64_t c = 0; c < d.hv; ++c) out[c] = acc[s * hvp + c] / l[s];
      if (row_lse != nullptr) *row_lse = m[s] + std::log(l[s]);
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 rows, I32 kv_len,
                   ffi::Buffer<ffi::S8> visible, I32 q_seg, I32 kv_seg, float scale,
                   int64_t dense, int64_t packed, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Dims d = dims_of(q.dimensions(), k.dimensions(), v.dimensions()[3], scale);
  Visibility vis = visibility_of(rows, kv_len, visible, q_seg, kv_seg, dense, packed);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, d.b * d.k, work_of(d), [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d, /*backward=*/false);
    panel.fill(d, kp, vp, bi, kh, -1, d.hv);
    attend_rows(d, vis, bi, kh, panel, qp, op, lp);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 rows, I32 kv_len,
                    ffi::Buffer<ffi::S8> visible, I32 q_seg, I32 kv_seg, F32 o, F32 lse,
                    F32 d_o, float scale, int64_t dense, int64_t packed,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Dims d = dims_of(q.dimensions(), k.dimensions(), v.dimensions()[3], scale);
  Visibility vis = visibility_of(rows, kv_len, visible, q_seg, kv_seg, dense, packed);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *opp = o.typed_data(), *lp = lse.typed_data(), *dop = d_o.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, d.b * d.k, work_of(d), [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d, /*backward=*/true);
    panel.fill(d, kp, vp, bi, kh, -1, d.hv);
    int64_t hp = panel.hp, hvp = panel.hvp, ld = panel.sp;
    std::vector<float> qs(kSlots * hp), dos(kSlots * hvp), p(kSlots * ld), ds(kSlots * ld),
        dq_rows(kSlots * hp), dk_rows(d.s * hp, 0.0f), dv_rows(d.s * hvp, 0.0f);
    float row_lse[kSlots], delta[kSlots], sums[kSlots];
    for (int64_t first = 0; first < d.t * d.g; first += kSlots) {
      Group gr(d, vis, bi, kh, first);
      std::fill(dos.begin(), dos.end(), 0.0f);
      for (int s = 0; s < kSlots; ++s) {
        Slot& sl = gr.slot[s];
        row_lse[s] = delta[s] = 0.0f;
        if (!sl.real) continue;
        int64_t at = row_at(d, bi, sl, d.hv);  // in o and do
        row_lse[s] = lp[(bi * d.n + sl.n) * d.t + sl.i];
        if (std::isinf(row_lse[s])) sl.j0 = sl.j1 = 0;  // the forward saw no key here
        if (sl.empty()) continue;
        for (int64_t c = 0; c < d.hv; ++c) {
          dos[s * hvp + c] = dop[at + c];
          delta[s] += dop[at + c] * opp[at + c];
        }
      }
      std::fill(dq_rows.begin(), dq_rows.end(), 0.0f);
      if (gr.u0 < gr.u1) {
        slot_queries(d, gr, qp, bi, hp, qs.data());
        // p = exp(logits - lse): the forward's probabilities, recomputed.
        slot_dots(gr, qs.data(), hp, panel.kt.data(), d.h, panel.sp, p.data(), ld);
        slot_hide(d, vis, bi, gr, p.data(), ld);
        slot_exp(gr, p.data(), ld, row_lse, sums);
        // dp_j = do . v_j; ds_j = p_j (dp_j - delta) (zero where p is).
        slot_dots(gr, dos.data(), hvp, panel.vt.data(), d.hv, panel.sp, ds.data(), ld);
        for (int s = 0; s < kSlots; ++s)
          for (int64_t j = gr.u0; j < gr.u1; ++j)
            ds[s * ld + j] = p[s * ld + j] * (ds[s * ld + j] - delta[s]);
        with_vectors(hvp / kLanes, [&](auto hv) {
          slot_add_outer<hv()>(gr, p.data(), ld, dos.data(), hvp, dv_rows.data());
        });
        with_vectors(hp / kLanes, [&](auto hv) {
          slot_add_outer<hv()>(gr, ds.data(), ld, qs.data(), hp, dk_rows.data());
          slot_weighted_rows<hv()>(gr, ds.data(), ld, panel.k_rows.data(), hp, dq_rows.data());
        });
      }
      for (int s = 0; s < kSlots; ++s) {
        const Slot& sl = gr.slot[s];
        if (!sl.real) continue;
        float* out = dqp + row_at(d, bi, sl, d.h);
        for (int64_t c = 0; c < d.h; ++c) out[c] = dq_rows[s * hp + c] * d.scale;
      }
    }
    for (int64_t j = 0; j < d.s; ++j) {
      int64_t at = (bi * d.s + j) * d.k + kh;
      for (int64_t c = 0; c < d.h; ++c) dkp[at * d.h + c] = dk_rows[j * hp + c];
      for (int64_t c = 0; c < d.hv; ++c) dvp[at * d.hv + c] = dv_rows[j * hvp + c];
    }
  });
  return ffi::Error::Success();
}

// A cache's new rows see the band lo <= j - pos <= hi from pos = lengths - T + i, and keys
// below lengths only.
Visibility cached_rows(const Dims& d, I32 lengths, int64_t lo, int64_t hi) {
  int64_t far = d.t + d.s;  // the band, clipped: +-inf arrive as +-2^40
  Visibility vis{nullptr, lengths.typed_data(), nullptr, nullptr, nullptr};
  vis.banded = true;
  vis.lo = std::clamp<int64_t>(lo, -far, far);
  vis.hi = std::clamp<int64_t>(hi, -far, far);
  return vis;
}

// The values' width and their entries' stride: v's own [.., Hv], or with value_dim > 0 the
// keys' first value_dim columns (v is then the keys themselves: a latent cache).
void value_layout(int64_t value_dim, int64_t h, int64_t v_width, int64_t* hv,
                  int64_t* stride) {
  *hv = value_dim > 0 ? value_dim : v_width;
  *stride = value_dim > 0 ? h : v_width;
}

// A contiguous cache's new rows: q [B, T, N, H] at positions lengths - T .. lengths - 1 over
// k [B, S, K, H], v [B, S, K, Hv], of which each batch row's first lengths[b] slots are
// written (forward only: decoding takes no gradients).
ffi::Error CachedForward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 lengths, float scale,
                         int64_t lo, int64_t hi, int64_t value_dim,
                         ffi::ResultBuffer<ffi::F32> o) {
  int64_t hv, v_stride;
  value_layout(value_dim, k.dimensions()[3], v.dimensions()[3], &hv, &v_stride);
  Dims d = dims_of(q.dimensions(), k.dimensions(), hv, scale);
  Visibility vis = cached_rows(d, lengths, lo, hi);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float* op = o->typed_data();
  parallel_for(pool, d.b * d.k, work_of(d), [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d, /*backward=*/false);
    panel.fill(d, kp, vp, bi, kh, vis.kv_len[bi], v_stride);
    attend_rows(d, vis, bi, kh, panel, qp, op, nullptr);
  });
  return ffi::Error::Success();
}

// A paged cache's new rows q [B, T, N, H] at the same positions, over the keys its block
// table names in the pools [K, P, L, H].
void attend_pages(ffi::ThreadPool& pool, F32 q, const float* kp, const float* vp,
                  ffi::AnyBuffer::Dimensions pd, I32 tables, I32 lengths, float scale,
                  int64_t lo, int64_t hi, int64_t hv, int64_t v_stride, float* op) {
  auto qd = q.dimensions();
  int64_t pages = pd[1], page = pd[2], per_row = tables.dimensions()[1];
  Dims d{qd[0], qd[1], per_row * page, qd[2], pd[0], qd[3], qd[2] / pd[0], scale, hv};
  Visibility vis = cached_rows(d, lengths, lo, hi);
  const float* qp = q.typed_data();
  const int32_t* tp = tables.typed_data();
  parallel_for(pool, d.b * d.k, work_of(d), [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d, /*backward=*/false);
    std::vector<int8_t> key_ok(d.s);
    Visibility mine = vis;
    if (!panel.fill_pages(d, kp, vp, tp + bi * per_row, pages, page, kh,
                          vis.kv_len[bi], key_ok, v_stride)) {
      mine.key_ok = key_ok.data();
    }
    attend_rows(d, mine, bi, kh, panel, qp, op, nullptr);
  });
}

ffi::Error PagedForward(ffi::ThreadPool pool, F32 q, F32 k_pages, F32 v_pages, I32 tables,
                        I32 lengths, float scale, int64_t lo, int64_t hi, int64_t value_dim,
                        ffi::ResultBuffer<ffi::F32> o) {
  int64_t hv, v_stride;
  value_layout(value_dim, k_pages.dimensions()[3], v_pages.dimensions()[3], &hv, &v_stride);
  attend_pages(pool, q, k_pages.typed_data(), v_pages.typed_data(), k_pages.dimensions(),
               tables, lengths, scale, lo, hi, hv, v_stride, o->typed_data());
  return ffi::Error::Success();
}

// A paged decode step that also stores its tokens: k_new/v_new [B, T, K, H] go to positions
// lengths - T .. lengths - 1 of each row's pages (through its block table; a page id outside
// [0, P) drops the token) in the pools, which XLA aliases to the outputs, and then the rows
// attend as in PagedForward. The stores finish before any task reads: rows that share a
// prefix page may store the same token there.
ffi::Error PagedWriteForward(ffi::ThreadPool pool, F32 q, F32 k_new, F32 v_new, F32 k_pages,
                             F32 v_pages, I32 tables, I32 lengths, float scale, int64_t lo,
                             int64_t hi, ffi::ResultBuffer<ffi::F32> o,
                             ffi::ResultBuffer<ffi::F32> k_out,
                             ffi::ResultBuffer<ffi::F32> v_out) {
  auto pd = k_pages.dimensions(), nd = k_new.dimensions();
  int64_t kh_n = pd[0], pages = pd[1], page = pd[2], h = pd[3];
  int64_t b_n = nd[0], t_n = nd[1], per_row = tables.dimensions()[1];
  int64_t pool_size = kh_n * pages * page * h;
  float *kp = k_out->typed_data(), *vp = v_out->typed_data();
  // XLA aliases each pool to its output; copy only where it did not.
  if (kp != k_pages.typed_data()) std::copy_n(k_pages.typed_data(), pool_size, kp);
  if (vp != v_pages.typed_data()) std::copy_n(v_pages.typed_data(), pool_size, vp);
  const int32_t *tp = tables.typed_data(), *lp = lengths.typed_data();
  for (int64_t bi = 0; bi < b_n; ++bi) {
    for (int64_t ti = 0; ti < t_n; ++ti) {
      int64_t pos = lp[bi] - t_n + ti;
      if (pos < 0 || pos >= per_row * page) continue;
      int64_t slot = page_slot(tp + bi * per_row, pages, page, pos);
      if (slot < 0) continue;
      for (int64_t kh = 0; kh < kh_n; ++kh) {
        int64_t from = ((bi * t_n + ti) * kh_n + kh) * h;
        int64_t to = (kh * pages * page + slot) * h;
        std::copy_n(k_new.typed_data() + from, h, kp + to);
        std::copy_n(v_new.typed_data() + from, h, vp + to);
      }
    }
  }
  attend_pages(pool, q, kp, vp, pd, tables, lengths, scale, lo, hi, h, h, o->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both take q, k, v, then what decides visibility: rows, kv_len, visible, q_seg, kv_seg.
XLA_FFI_DEFINE_HANDLER_SYMBOL(TxCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<I32>().Arg<I32>().Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<I32>().Arg<I32>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("dense")
                                  .Attr<int64_t>("packed")
                                  .Ret<F32>()    // o
                                  .Ret<F32>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(TxCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<I32>().Arg<I32>().Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<I32>().Arg<I32>()
                                  .Arg<F32>()    // o
                                  .Arg<F32>()    // lse
                                  .Arg<F32>()    // do
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("dense")
                                  .Attr<int64_t>("packed")
                                  .Ret<F32>()    // dq
                                  .Ret<F32>()    // dk
                                  .Ret<F32>());  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(TxCpuCachedAttention, CachedForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // q
                                  .Arg<F32>()    // k
                                  .Arg<F32>()    // v
                                  .Arg<I32>()    // lengths
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("lo")
                                  .Attr<int64_t>("hi")
                                  .Attr<int64_t>("value_dim")  // > 0: v is k (latent)
                                  .Ret<F32>());  // o

XLA_FFI_DEFINE_HANDLER_SYMBOL(TxCpuPagedAttention, PagedForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // q
                                  .Arg<F32>()    // k_pages
                                  .Arg<F32>()    // v_pages
                                  .Arg<I32>()    // block tables
                                  .Arg<I32>()    // lengths
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("lo")
                                  .Attr<int64_t>("hi")
                                  .Attr<int64_t>("value_dim")  // > 0: v_pages is k_pages
                                  .Ret<F32>());  // o

XLA_FFI_DEFINE_HANDLER_SYMBOL(TxCpuPagedWriteAttention, PagedWriteForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()    // q
                                  .Arg<F32>()    // k_new
                                  .Arg<F32>()    // v_new
                                  .Arg<F32>()    // k_pages (aliased to the k_pages result)
                                  .Arg<F32>()    // v_pages (aliased to the v_pages result)
                                  .Arg<I32>()    // block tables
                                  .Arg<I32>()    // lengths
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("lo")
                                  .Attr<int64_t>("hi")
                                  .Ret<F32>()    // o
                                  .Ret<F32>()    // k_pages
                                  .Ret<F32>());  // v_pages
