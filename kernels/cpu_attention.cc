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
// Vectors, exp and the thread pool's loop are in cpu_simd.h.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using tx_cpu::exp_neg;
using tx_cpu::i16;
using tx_cpu::kLanes;
using tx_cpu::load;
using tx_cpu::parallel_for;
using tx_cpu::splat;
using tx_cpu::store;
using tx_cpu::v16;

struct Dims {
  int64_t b, t, s, n, k, h, g;
  float scale;
};

Dims dims_of(ffi::AnyBuffer::Dimensions q, ffi::AnyBuffer::Dimensions k, float scale) {
  return Dims{q[0], q[1], k[1], q[2], k[2], q[3], q[2] / k[2], scale};
}

struct Visibility {
  const int32_t* rows;     // [T, 2]
  const int32_t* kv_len;   // [B]
  const int8_t* visible;   // [T, S], or null: every key in a row's range is visible
  const int32_t *q_seg, *kv_seg;  // [B, T] / [B, S], or null: no packing

  // Keys [j0, j1) that row i of batch row bi may see; j0 >= j1 when it sees none.
  void range(const Dims& d, int64_t bi, int64_t i, int64_t* j0, int64_t* j1) const {
    *j0 = std::max<int64_t>(rows[2 * i], 0);
    *j1 = std::min<int64_t>({rows[2 * i + 1], kv_len[bi], d.s});
  }
  bool per_key() const { return visible != nullptr || q_seg != nullptr; }
  bool sees(const Dims& d, int64_t bi, int64_t i, int64_t j) const {
    if (visible != nullptr && !visible[i * d.s + j]) return false;
    return q_seg == nullptr || q_seg[bi * d.t + i] == kv_seg[bi * d.s + j];
  }
};

// One (batch row, K/V head): its keys transposed [H, Sp] and its values [S, Hp], zero-padded
// to whole vectors, so a row's logits are vector FMAs over keys and its output over channels.
struct Panel {
  int64_t sp, hp;
  std::vector<float> kt, k_rows, vt, v_rows;
  // The transposed panels' row stride is padded by one vector past a whole number of them:
  // a power-of-two stride (S = 256) maps every channel's keys to the same few L1 sets.
  Panel(const Dims& d) : sp((d.s + kLanes - 1) / kLanes * kLanes + kLanes),
                         hp((d.h + kLanes - 1) / kLanes * kLanes),
                         kt(d.h * sp), k_rows(d.s * hp), vt(d.h * sp), v_rows(d.s * hp) {}
  void fill(const Dims& d, const float* k, const float* v, int64_t bi, int64_t kh,
            bool transposed_v) {
    std::fill(kt.begin(), kt.end(), 0.0f);
    std::fill(k_rows.begin(), k_rows.end(), 0.0f);
    std::fill(v_rows.begin(), v_rows.end(), 0.0f);
    if (transposed_v) std::fill(vt.begin(), vt.end(), 0.0f);
    for (int64_t j = 0; j < d.s; ++j) {
      const float* kj = k + ((bi * d.s + j) * d.k + kh) * d.h;
      const float* vj = v + ((bi * d.s + j) * d.k + kh) * d.h;
      for (int64_t c = 0; c < d.h; ++c) {
        kt[c * sp + j] = kj[c];
        k_rows[j * hp + c] = kj[c];
        v_rows[j * hp + c] = vj[c];
        if (transposed_v) vt[c * sp + j] = vj[c];
      }
    }
  }
};

// A task walks its (row, query head) pairs four at a time, row-major: the G heads of a row,
// or (G = 1) four consecutive rows. The four share every load of a key, value or gradient
// row, so each load feeds four FMAs. Each pair ("slot") keeps its own key range [j0, j1);
// the loops run over the union [u0, u1), and a slot's weights are exact zeros outside its
// range, so the extra keys add nothing. A slot past the last pair, or a row that sees no
// key, has an empty range.
constexpr int kSlots = 4;

struct Slot {
  int64_t i = 0, n = 0, j0 = 0, j1 = 0;
  bool real = false;
  bool empty() const { return j0 >= j1; }
};

struct Group {
  Slot slot[kSlots];
  int64_t u0, u1;  // union of the slots' key ranges; u0 >= u1 when all are empty
  Group(const Dims& d, const Visibility& vis, int64_t bi, int64_t kh, int64_t first)
      : u0(d.s), u1(0) {
    for (int s = 0; s < kSlots; ++s) {
      int64_t pair = first + s;
      if (pair >= d.t * d.g) continue;
      Slot& sl = slot[s];
      sl.real = true;
      sl.i = pair / d.g;
      sl.n = kh * d.g + pair % d.g;
      vis.range(d, bi, sl.i, &sl.j0, &sl.j1);
      if (sl.empty()) {
        sl.j0 = sl.j1 = 0;
      } else {
        u0 = std::min(u0, sl.j0);
        u1 = std::max(u1, sl.j1);
      }
    }
  }
  int64_t v0() const { return u0 / kLanes * kLanes; }
  int64_t v1() const { return (u1 + kLanes - 1) / kLanes * kLanes; }
};

// out[s][j] = sum_c a[s][c] * t[c * sp + j] over the vectors covering [u0, u1), two
// vectors of keys at a time (eight independent FMA chains).
inline void slot_dots(const Group& gr, const float* a, int64_t hp, const float* t, int64_t h,
                      int64_t sp, float* out, int64_t ld) {
  int64_t j = gr.v0();
  for (; j + kLanes < gr.v1(); j += 2 * kLanes) {
    v16 acc0[kSlots] = {}, acc1[kSlots] = {};
    for (int64_t c = 0; c < h; ++c) {
      v16 k0 = load(t + c * sp + j), k1 = load(t + c * sp + j + kLanes);
      for (int s = 0; s < kSlots; ++s) {
        v16 as = splat(a[s * hp + c]);
        acc0[s] += as * k0;
        acc1[s] += as * k1;
      }
    }
    for (int s = 0; s < kSlots; ++s) {
      store(out + s * ld + j, acc0[s]);
      store(out + s * ld + j + kLanes, acc1[s]);
    }
  }
  if (j < gr.v1()) {
    v16 acc[kSlots] = {};
    for (int64_t c = 0; c < h; ++c) {
      v16 kv = load(t + c * sp + j);
      for (int s = 0; s < kSlots; ++s) acc[s] += splat(a[s * hp + c]) * kv;
    }
    for (int s = 0; s < kSlots; ++s) store(out + s * ld + j, acc[s]);
  }
}

// Logits of keys a slot may not see inside its range become -inf (the per-key checks); a
// slot left with none is emptied. Returns whether any slot still sees a key.
inline bool slot_hide(const Dims& d, const Visibility& vis, int64_t bi, Group& gr, float* x,
                      int64_t ld) {
  if (!vis.per_key()) return gr.u0 < gr.u1;
  bool any = false;
  for (int s = 0; s < kSlots; ++s) {
    Slot& sl = gr.slot[s];
    bool seen = false;
    for (int64_t j = sl.j0; j < sl.j1; ++j) {
      if (vis.sees(d, bi, sl.i, j)) {
        seen = true;
      } else {
        x[s * ld + j] = -std::numeric_limits<float>::infinity();
      }
    }
    if (!seen) sl.j0 = sl.j1 = 0;
    any |= seen;
  }
  return any;
}

// x[s][j] = exp(x[s][j] - shift[s]) inside slot s's range and 0 elsewhere on [v0, v1);
// returns each slot's sum.
inline void slot_exp(const Group& gr, float* x, int64_t ld, const float* shift, float* sums) {
  for (int s = 0; s < kSlots; ++s) {
    const Slot& sl = gr.slot[s];
    float* row = x + s * ld;
    v16 total = splat(0.0f);
    for (int64_t j = gr.v0(); j < gr.v1(); j += kLanes) {
      v16 e = splat(0.0f);
      if (j + kLanes > sl.j0 && j < sl.j1) {
        v16 x = load(row + j);
        e = exp_neg(x - splat(shift[s]));
        e = x == splat(-std::numeric_limits<float>::infinity()) ? splat(0.0f) : e;
        if (j < sl.j0 || j + kLanes > sl.j1) {  // a vector across the range's edge
          i16 key = tx_cpu::iota() + static_cast<int32_t>(j);
          e = (key >= static_cast<int32_t>(sl.j0)) & (key < static_cast<int32_t>(sl.j1))
                  ? e : splat(0.0f);
        }
      }
      store(row + j, e);
      total += e;
    }
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += total[l];
    sums[s] = sum;
  }
}

// The head dim in vectors, HV = hp / 16, is a template argument below: the loops over it
// unroll and their accumulators stay in registers. with_vectors() picks the instance.
template <typename F>
void with_vectors(int64_t hv, F f) {
  switch (hv) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 0>{});  // any width, not unrolled
  }
}

// acc[s][:hp] = sum_j w[s][j] * rows[j, :hp] over [u0, u1).
template <int HV>
void slot_weighted_rows(const Group& gr, const float* w, int64_t ld, const float* rows,
                        int64_t hp_any, float* acc) {
  if constexpr (HV == 0) {
    for (int64_t c = 0; c < hp_any; c += kLanes) {
      v16 a[kSlots] = {};
      for (int64_t j = gr.u0; j < gr.u1; ++j) {
        v16 r = load(rows + j * hp_any + c);
        for (int s = 0; s < kSlots; ++s) a[s] += splat(w[s * ld + j]) * r;
      }
      for (int s = 0; s < kSlots; ++s) store(acc + s * hp_any + c, a[s]);
    }
  } else {
    constexpr int64_t hp = HV * kLanes;
    v16 a[kSlots][HV] = {};
    for (int64_t j = gr.u0; j < gr.u1; ++j) {
      v16 r[HV];
      for (int c = 0; c < HV; ++c) r[c] = load(rows + j * hp + c * kLanes);
      for (int s = 0; s < kSlots; ++s) {
        v16 ws = splat(w[s * ld + j]);
        for (int c = 0; c < HV; ++c) a[s][c] += ws * r[c];
      }
    }
    for (int s = 0; s < kSlots; ++s)
      for (int c = 0; c < HV; ++c) store(acc + s * hp + c * kLanes, a[s][c]);
  }
}

// rows[j, :hp] += sum_s w[s][j] * x[s][:hp] over [u0, u1).
template <int HV>
void slot_add_outer(const Group& gr, const float* w, int64_t ld, const float* x,
                    int64_t hp_any, float* rows) {
  if constexpr (HV == 0) {
    for (int64_t j = gr.u0; j < gr.u1; ++j) {
      for (int64_t c = 0; c < hp_any; c += kLanes) {
        v16 r = load(rows + j * hp_any + c);
        for (int s = 0; s < kSlots; ++s) r += splat(w[s * ld + j]) * load(x + s * hp_any + c);
        store(rows + j * hp_any + c, r);
      }
    }
  } else {
    constexpr int64_t hp = HV * kLanes;
    v16 xs[kSlots][HV];
    for (int s = 0; s < kSlots; ++s)
      for (int c = 0; c < HV; ++c) xs[s][c] = load(x + s * hp + c * kLanes);
    for (int64_t j = gr.u0; j < gr.u1; ++j) {
      v16 r[HV];
      for (int c = 0; c < HV; ++c) r[c] = load(rows + j * hp + c * kLanes);
      for (int s = 0; s < kSlots; ++s) {
        v16 ws = splat(w[s * ld + j]);
        for (int c = 0; c < HV; ++c) r[c] += ws * xs[s][c];
      }
      for (int c = 0; c < HV; ++c) store(rows + j * hp + c * kLanes, r[c]);
    }
  }
}

// The slots' scaled queries (zero-padded to hp; zero for slots that are not real).
inline void slot_queries(const Dims& d, const Group& gr, const float* q, int64_t bi,
                         int64_t hp, float* out) {
  std::fill(out, out + kSlots * hp, 0.0f);
  for (int s = 0; s < kSlots; ++s) {
    const Slot& sl = gr.slot[s];
    if (!sl.real) continue;
    const float* qi = q + ((bi * d.t + sl.i) * d.n + sl.n) * d.h;
    for (int64_t c = 0; c < d.h; ++c) out[s * hp + c] = qi[c] * d.scale;
  }
}

inline int64_t row_at(const Dims& d, int64_t bi, const Slot& sl) {
  return ((bi * d.t + sl.i) * d.n + sl.n) * d.h;
}

using I32 = ffi::Buffer<ffi::S32>;
using F32 = ffi::Buffer<ffi::F32>;

Visibility visibility_of(I32 rows, I32 kv_len, ffi::Buffer<ffi::S8> visible, I32 q_seg,
                         I32 kv_seg, int64_t dense, int64_t packed) {
  return Visibility{rows.typed_data(), kv_len.typed_data(),
                    dense ? visible.typed_data() : nullptr,
                    packed ? q_seg.typed_data() : nullptr,
                    packed ? kv_seg.typed_data() : nullptr};
}

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 rows, I32 kv_len,
                   ffi::Buffer<ffi::S8> visible, I32 q_seg, I32 kv_seg, float scale,
                   int64_t dense, int64_t packed, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Dims d = dims_of(q.dimensions(), k.dimensions(), scale);
  Visibility vis = visibility_of(rows, kv_len, visible, q_seg, kv_seg, dense, packed);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, d.b * d.k, [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d);
    panel.fill(d, kp, vp, bi, kh, /*transposed_v=*/false);
    int64_t hp = panel.hp, ld = panel.sp;
    std::vector<float> qs(kSlots * hp), logits(kSlots * ld), acc(kSlots * hp);
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
          with_vectors(hp / kLanes, [&](auto hv) {
            slot_weighted_rows<hv()>(gr, logits.data(), ld, panel.v_rows.data(), hp,
                                     acc.data());
          });
        }
      }
      for (int s = 0; s < kSlots; ++s) {
        const Slot& sl = gr.slot[s];
        if (!sl.real) continue;
        float* out = op + row_at(d, bi, sl);
        float* row_lse = lp + (bi * d.n + sl.n) * d.t + sl.i;
        if (sl.empty()) {  // sees no key: zeros, and an lse the backward reads as "skip"
          std::fill(out, out + d.h, 0.0f);
          *row_lse = std::numeric_limits<float>::infinity();
          continue;
        }
        for (int64_t c = 0; c < d.h; ++c) out[c] = acc[s * hp + c] / l[s];
        *row_lse = m[s] + std::log(l[s]);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 rows, I32 kv_len,
                    ffi::Buffer<ffi::S8> visible, I32 q_seg, I32 kv_seg, F32 o, F32 lse,
                    F32 d_o, float scale, int64_t dense, int64_t packed,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Dims d = dims_of(q.dimensions(), k.dimensions(), scale);
  Visibility vis = visibility_of(rows, kv_len, visible, q_seg, kv_seg, dense, packed);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *opp = o.typed_data(), *lp = lse.typed_data(), *dop = d_o.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, d.b * d.k, [&](int64_t item) {
    int64_t bi = item / d.k, kh = item % d.k;
    Panel panel(d);
    panel.fill(d, kp, vp, bi, kh, /*transposed_v=*/true);
    int64_t hp = panel.hp, ld = panel.sp;
    std::vector<float> qs(kSlots * hp), dos(kSlots * hp), p(kSlots * ld), ds(kSlots * ld),
        dq_rows(kSlots * hp), dk_rows(d.s * hp, 0.0f), dv_rows(d.s * hp, 0.0f);
    float row_lse[kSlots], delta[kSlots], sums[kSlots];
    for (int64_t first = 0; first < d.t * d.g; first += kSlots) {
      Group gr(d, vis, bi, kh, first);
      std::fill(dos.begin(), dos.end(), 0.0f);
      for (int s = 0; s < kSlots; ++s) {
        Slot& sl = gr.slot[s];
        row_lse[s] = delta[s] = 0.0f;
        if (!sl.real) continue;
        int64_t at = row_at(d, bi, sl);
        row_lse[s] = lp[(bi * d.n + sl.n) * d.t + sl.i];
        if (std::isinf(row_lse[s])) sl.j0 = sl.j1 = 0;  // the forward saw no key here
        if (sl.empty()) continue;
        for (int64_t c = 0; c < d.h; ++c) {
          dos[s * hp + c] = dop[at + c];
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
        slot_dots(gr, dos.data(), hp, panel.vt.data(), d.h, panel.sp, ds.data(), ld);
        for (int s = 0; s < kSlots; ++s)
          for (int64_t j = gr.u0; j < gr.u1; ++j)
            ds[s * ld + j] = p[s * ld + j] * (ds[s * ld + j] - delta[s]);
        with_vectors(hp / kLanes, [&](auto hv) {
          slot_add_outer<hv()>(gr, p.data(), ld, dos.data(), hp, dv_rows.data());
          slot_add_outer<hv()>(gr, ds.data(), ld, qs.data(), hp, dk_rows.data());
          slot_weighted_rows<hv()>(gr, ds.data(), ld, panel.k_rows.data(), hp, dq_rows.data());
        });
      }
      for (int s = 0; s < kSlots; ++s) {
        const Slot& sl = gr.slot[s];
        if (!sl.real) continue;
        float* out = dqp + row_at(d, bi, sl);
        for (int64_t c = 0; c < d.h; ++c) out[c] = dq_rows[s * hp + c] * d.scale;
      }
    }
    for (int64_t j = 0; j < d.s; ++j) {
      int64_t at = ((bi * d.s + j) * d.k + kh) * d.h;
      for (int64_t c = 0; c < d.h; ++c) {
        dkp[at + c] = dk_rows[j * hp + c];
        dvp[at + c] = dv_rows[j * hp + c];
      }
    }
  });
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
