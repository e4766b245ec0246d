// The row machinery of the fused CPU attention kernels (cpu_attention.cc): shapes, what a
// row may see, a task's K/V panel, and the four-slot loops over a group of rows.

#ifndef TX_KERNELS_CPU_ROWS_H_
#define TX_KERNELS_CPU_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace tx_cpu {

// h: the q/k head dim; hv: the values' (and the output's), h but for MLA's expanded form
// (192 vs 128) or a latent cache (values = the keys' first hv columns).
struct Dims {
  int64_t b, t, s, n, k, h, g;
  float scale;
  int64_t hv;
};

Dims dims_of(ffi::AnyBuffer::Dimensions q, ffi::AnyBuffer::Dimensions k, int64_t hv,
             float scale) {
  return Dims{q[0], q[1], k[1], q[2], k[2], q[3], q[2] / k[2], scale, hv};
}

struct Visibility {
  const int32_t* rows;     // [T, 2], or null with `banded`
  const int32_t* kv_len;   // [B]
  const int8_t* visible;   // [T, S], or null: every key in a row's range is visible
  const int32_t *q_seg, *kv_seg;  // [B, T] / [B, S], or null: no packing
  // A KV cache's rows: row i of batch row bi sits at position kv_len[bi] - T + i and sees
  // lo <= j - pos <= hi; key_ok [S] (one task's, or null) hides keys on invalid pages.
  bool banded = false;
  int64_t lo = 0, hi = 0;
  const int8_t* key_ok = nullptr;

  // Keys [j0, j1) that row i of batch row bi may see; j0 >= j1 when it sees none.
  void range(const Dims& d, int64_t bi, int64_t i, int64_t* j0, int64_t* j1) const {
    if (banded) {
      int64_t pos = kv_len[bi] - d.t + i;
      *j0 = std::max<int64_t>(pos + lo, 0);
      *j1 = std::min<int64_t>({pos + hi + 1, kv_len[bi], d.s});
      return;
    }
    *j0 = std::max<int64_t>(rows[2 * i], 0);
    *j1 = std::min<int64_t>({rows[2 * i + 1], kv_len[bi], d.s});
  }
  bool per_key() const { return visible != nullptr || q_seg != nullptr || key_ok != nullptr; }
  bool sees(const Dims& d, int64_t bi, int64_t i, int64_t j) const {
    if (visible != nullptr && !visible[i * d.s + j]) return false;
    if (key_ok != nullptr && !key_ok[j]) return false;
    return q_seg == nullptr || q_seg[bi * d.t + i] == kv_seg[bi * d.s + j];
  }
};

// Where key j of a row lies in a pool of `pages` pages of `page` keys, through the row's
// block table: page id * page + offset, or -1 when the id is outside [0, pages).
inline int64_t page_slot(const int32_t* table, int64_t pages, int64_t page, int64_t j) {
  int64_t id = table[j / page];
  return id < 0 || id >= pages ? -1 : id * page + j % page;
}

// Floats left uninitialised (std::vector would zero them): whoever fills one writes every
// entry that is read.
class Scratch {
 public:
  explicit Scratch(int64_t n) : n_(n), p_(n > 0 ? new float[n] : nullptr) {}
  float* data() { return p_.get(); }
  const float* data() const { return p_.get(); }
  float& operator[](int64_t i) { return p_[i]; }
  bool empty() const { return n_ == 0; }

 private:
  int64_t n_;
  std::unique_ptr<float[]> p_;
};

// One (batch row, K/V head): its keys transposed [H, Sp] and its values [S, Hvp], padded
// with zeros to whole vectors, so a row's logits are vector FMAs over keys and its output
// over channels. The backward also reads the keys as rows (for dQ) and the values
// transposed (for dP).
struct Panel {
  int64_t sp, hp, h, hvp, hv;
  bool backward;
  Scratch kt, k_rows, vt, v_rows;
  // The transposed panels' row stride is padded by one vector past a whole number of them:
  // a power-of-two stride (S = 256) maps every channel's keys to the same few L1 sets.
  Panel(const Dims& d, bool backward)
      : sp((d.s + kLanes - 1) / kLanes * kLanes + kLanes),
        hp((d.h + kLanes - 1) / kLanes * kLanes),
        h(d.h),
        hvp((d.hv + kLanes - 1) / kLanes * kLanes),
        hv(d.hv),
        backward(backward),
        kt(d.h * sp),
        k_rows(backward ? d.s * hp : 0),
        vt(backward ? d.hv * sp : 0),
        v_rows(d.s * hvp) {}
  // Batch row bi's keys [0, filled) of K/V head kh from k [B, S, K, H] and v (a contiguous
  // cache passes its length: the slots past it hold nothing yet). v's entries are
  // v_stride apart: hv for v [B, S, K, Hv]; h where v is k itself (a latent cache, whose
  // values are each key's first hv columns).
  void fill(const Dims& d, const float* k, const float* v, int64_t bi, int64_t kh,
            int64_t filled, int64_t v_stride) {
    int64_t upto = filled < 0 ? d.s : std::min<int64_t>(filled, d.s);
    for (int64_t j = 0; j < upto; ++j) {
      const float* kj = k + ((bi * d.s + j) * d.k + kh) * d.h;
      const float* vj = v + ((bi * d.s + j) * d.k + kh) * v_stride;
      for (int64_t c = 0; c < d.h; ++c) {
        kt[c * sp + j] = kj[c];
        if (backward) k_rows[j * hp + c] = kj[c];
      }
      for (int64_t c = 0; c < d.hv; ++c) {
        v_rows[j * hvp + c] = vj[c];
        if (backward) vt[c * sp + j] = vj[c];
      }
      pad_row(j);
    }
    pad_keys(upto);
  }
  // From a page pool [K, P, L, H] through batch row bi's block table (max_pages ids), the
  // first `len` keys; a key on a page id outside [0, P) reads as zero and key_ok[j] = 0.
  // Returns whether every page read was valid.
  // v_pages' entries are v_stride apart, as in fill().
  bool fill_pages(const Dims& d, const float* k_pages, const float* v_pages,
                  const int32_t* table, int64_t pages, int64_t page, int64_t kh, int64_t len,
                  std::vector<int8_t>& key_ok, int64_t v_stride) {
    std::fill(key_ok.begin(), key_ok.end(), 1);
    bool all_valid = true;
    int64_t upto = std::min<int64_t>(len, d.s);
    for (int64_t j = 0; j < upto; ++j) {
      int64_t slot = page_slot(table, pages, page, j);
      bool valid = slot >= 0;
      int64_t at = kh * pages * page + (valid ? slot : 0);
      for (int64_t c = 0; c < d.h; ++c) kt[c * sp + j] = valid ? k_pages[at * d.h + c] : 0.0f;
      for (int64_t c = 0; c < d.hv; ++c)
        v_rows[j * hvp + c] = valid ? v_pages[at * v_stride + c] : 0.0f;
      pad_row(j);
      if (!valid) {
        key_ok[j] = 0;
        all_valid = false;
      }
    }
    pad_keys(upto);
    return all_valid;
  }

 private:
  // The panels are not zeroed as a whole: the loops read a row's channels up to hp, and keys
  // [0, upto) plus at most the rest of the last vector past them (the range loops of
  // Group); those are the entries written here. Zeroing all S keys per task cost as much as
  // a decode step's attention itself.
  void pad_row(int64_t j) {
    std::fill(v_rows.data() + j * hvp + hv, v_rows.data() + (j + 1) * hvp, 0.0f);
    if (!k_rows.empty()) std::fill(k_rows.data() + j * hp + h, k_rows.data() + (j + 1) * hp, 0.0f);
  }
  void pad_keys(int64_t upto) {
    int64_t end = std::min<int64_t>(sp, (upto + kLanes - 1) / kLanes * kLanes + kLanes);
    for (int64_t c = 0; c < h; ++c)
      std::fill(kt.data() + c * sp + upto, kt.data() + c * sp + end, 0.0f);
    if (vt.empty()) return;
    for (int64_t c = 0; c < hv; ++c)
      std::fill(vt.data() + c * sp + upto, vt.data() + c * sp + end, 0.0f);
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

// Where a slot's row starts in a [B, T, N, width] array (q: h; the output: hv).
inline int64_t row_at(const Dims& d, int64_t bi, const Slot& sl, int64_t width) {
  return ((bi * d.t + sl.i) * d.n + sl.n) * width;
}

}  // namespace tx_cpu

#endif  // TX_KERNELS_CPU_ROWS_H_
