// Sparse x dense products for CPU decode (1..8 tokens per pass), built twice from this one source:
// - AVX2 + FMA + F16C (the default build): every 8 columns, one mask byte selects a lookup-table entry that
//   expands the next popcount(byte) packed values into a dense 8-lane vector (vpshufb, see expand.h);
// - AVX-512 (F, BW, VL, DQ, VBMI2; -DSPARSECRAFT_AVX512): every 16 columns, a 16-bit mask feeds a masked
//   expand-load (vexpandps / vpexpandw, `_mm512_maskz_expandloadu_ps`) that places the next popcount(mask) packed
//   values in their lanes, zeros elsewhere, with no table and no over-read;
// then the dense vector is multiplied with the activations ("load as sparse, compute as dense"). Bytes moved per
// weight: density * itemsize + 1/8. For very sparse rows a CSR variant (uint16/int32 column indices) skips the
// zeros entirely (AVX-512: 16-lane gathers of x). Python picks the build at run time (kernels/build.py).
// Every entry point validates its arguments (checks.h); the costly checks are fused into the row loops.
// Threads: at::parallel_for over output rows (torch's own OpenMP pool, so no second runtime).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "checks.h"
#include "expand.h"

#ifdef SPARSECRAFT_AVX512
#define SPARSECRAFT_ISA "avx512"
#else
#define SPARSECRAFT_ISA "avx2"
#endif

namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#ifdef SPARSECRAFT_AVX512
// 16 mask bits + the packed values -> a dense 16-lane fp32 vector; reads exactly popcount(m16) values.
// Two forms, chosen at build time (kernels/build.py): the memory form of vexpandps (`_mm512_maskz_expandloadu_ps`,
// SPARSECRAFT_EXPAND_FROM_MEMORY, Intel), measured 1.1-1.4x faster than the pair below at batch 1 on a Sapphire
// Rapids-class Xeon (bench/probe_expand.py, docs/kernels.md); and a masked load of the popcount(m16) values
// (fault-suppressed, so no over-read) + the register form, for AMD Zen 4/5, where the memory form is microcoded
// and measured 1.8x slower than this pair.
inline __mmask16 first_n(unsigned m16) { return (__mmask16)_bzhi_u32(0xffffu, (unsigned)__builtin_popcount(m16)); }
inline __m512 expand16(const float* v, unsigned m16) {
#ifdef SPARSECRAFT_EXPAND_FROM_MEMORY
  return _mm512_maskz_expandloadu_ps((__mmask16)m16, v);
#else
  return _mm512_maskz_expand_ps((__mmask16)m16, _mm512_maskz_loadu_ps(first_n(m16), v));
#endif
}
inline __m256i expand16_bf16(const uint16_t* v, unsigned m16) {
#ifdef SPARSECRAFT_EXPAND_FROM_MEMORY
  return _mm256_maskz_expandloadu_epi16((__mmask16)m16, v);
#else
  return _mm256_maskz_expand_epi16((__mmask16)m16, _mm256_maskz_loadu_epi16(first_n(m16), v));
#endif
}
inline __m512 expand16(const uint16_t* v, unsigned m16) {  // bf16 is the high half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(expand16_bf16(v, m16)), 16));
}

// Offsets of the four 16-column chunks of one 64-bit mask word into its packed values: independent popcounts
// (not a running sum), so the four expand-loads can issue back to back.
struct Chunks {
  unsigned m[4];
  int64_t off[4];
  int64_t total;
  explicit Chunks(uint64_t w) {
    for (int j = 0; j < 4; ++j) m[j] = (unsigned)(w >> (16 * j)) & 0xffffu;
    off[0] = 0;
    off[1] = __builtin_popcountll(w & 0xffffull);
    off[2] = __builtin_popcountll(w & 0xffffffffull);
    off[3] = __builtin_popcountll(w & 0xffffffffffffull);
    total = __builtin_popcountll(w);
  }
};
#endif

// out[b, o] = sum_c W[o, c] x[b, c] for rows [r0, r1) and B tokens. x is (B, words * 64) fp32, zero padded.
// A independent accumulators per token hide the FMA latency when B is small. A row whose mask disagrees with
// row_ptr is skipped before any of its values is read, and reported through ``bad``.
template <typename V, int B, bool SKIP>
void bitmask_rows(const uint64_t* mask, int64_t words, uint64_t tail, const V* vals, const int64_t* row_ptr,
                  const float* x, float* out, int64_t out_stride, int64_t r0, int64_t r1, BadRow& bad) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  const int64_t xs = words * 64;
  for (int64_t o = r0; o < r1; ++o) {
    const uint64_t* mrow = mask + o * words;
    if (!row_consistent(mrow, words, tail, row_ptr[o + 1] - row_ptr[o])) {
      bad.note(o);
      continue;
    }
    const V* v = vals + row_ptr[o];
#ifdef SPARSECRAFT_AVX512
    __m512 acc[B][A];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < A; ++a) acc[b][a] = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      if (SKIP && mrow[w] == 0) continue;
      const Chunks ch(mrow[w]);
      const float* xw = x + w * 64;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (SKIP && ch.m[j] == 0) continue;
        const __m512 wv = expand16(v + ch.off[j], ch.m[j]);
        for (int b = 0; b < B; ++b)
          acc[b][j % A] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xw + b * xs + 16 * j), acc[b][j % A]);
      }
      v += ch.total;
    }
    for (int b = 0; b < B; ++b) {
      __m512 s = acc[b][0];
      for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[b][a]);
      out[b * out_stride + o] = _mm512_reduce_add_ps(s);
    }
#else
    __m256 acc[B][A];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < A; ++a) acc[b][a] = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      const uint64_t m = mrow[w];
      if (SKIP && m == 0) continue;
      const float* xw = x + w * 64;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const unsigned byte = (unsigned)(m >> (8 * j)) & 0xffu;
        if (SKIP && byte == 0) continue;
        const __m256 wv = expand(v, byte);
        v += __builtin_popcount(byte);
        for (int b = 0; b < B; ++b)
          acc[b][j % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xw + b * xs + 8 * j), acc[b][j % A]);
      }
    }
    for (int b = 0; b < B; ++b) {
      __m256 s = acc[b][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[b][a]);
      out[b * out_stride + o] = hsum(s);
    }
#endif
  }
}

// One 64-column mask word of one row times x (the 64 columns ``xp``) into two accumulators; returns the values
// consumed. The expands of one word read at offsets that are independent popcounts of the word's low bits.
#ifdef SPARSECRAFT_AVX512
using Acc = __m512;
constexpr int LANES = 16;
inline Acc zero() { return _mm512_setzero_ps(); }
inline Acc load(const float* p) { return _mm512_loadu_ps(p); }
inline float reduce(Acc a, Acc b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
template <typename V>
inline int64_t word_fma(const V* v, uint64_t m, const Acc* xw, Acc& a0, Acc& a1) {
  a0 = _mm512_fmadd_ps(expand16(v, (unsigned)m & 0xffffu), xw[0], a0);
  a1 = _mm512_fmadd_ps(expand16(v + __builtin_popcountll(m & 0xffffull), (unsigned)(m >> 16) & 0xffffu), xw[1], a1);
  a0 = _mm512_fmadd_ps(expand16(v + __builtin_popcountll(m & 0xffffffffull), (unsigned)(m >> 32) & 0xffffu), xw[2],
                       a0);
  a1 = _mm512_fmadd_ps(expand16(v + __builtin_popcountll(m & 0xffffffffffffull), (unsigned)(m >> 48)), xw[3], a1);
  return __builtin_popcountll(m);
}
constexpr int64_t OVER_READ = 0;  // expand-loads read exactly popcount values
#else
using Acc = __m256;
constexpr int LANES = 8;
inline Acc zero() { return _mm256_setzero_ps(); }
inline Acc load(const float* p) { return _mm256_loadu_ps(p); }
inline float reduce(Acc a, Acc b) { return hsum(_mm256_add_ps(a, b)); }
template <typename V>
inline int64_t word_fma(const V* v, uint64_t m, const Acc* xw, Acc& a0, Acc& a1) {
#pragma GCC unroll 8
  for (int j = 0; j < 8; j += 2) {
    const int64_t below = j == 0 ? 0 : __builtin_popcountll(m & ((1ull << (8 * j)) - 1));
    const unsigned b0 = (unsigned)(m >> (8 * j)) & 0xffu, b1 = (unsigned)(m >> (8 * j + 8)) & 0xffu;
    a0 = _mm256_fmadd_ps(expand(v + below, b0), xw[j], a0);
    a1 = _mm256_fmadd_ps(expand(v + below + __builtin_popcount(b0), b1), xw[j + 1], a1);
  }
  return __builtin_popcountll(m);
}
constexpr int64_t OVER_READ = 8;  // the table expander loads 8 values whatever the byte keeps
#endif

// Batch 1 (the decode case), both ISAs: two rows per step, so two independent value streams are in flight (the
// expands of one row wait on its running value offset), each x vector is loaded once for both rows, and a
// software prefetch runs 512 bytes ahead in each stream. Measured at batch 1 streamed from memory, one thread
// (bench/probe_expand.py, docs/kernels.md), AVX-512: 1.17x -> 1.58x dense at 50% fp32, 1.51x -> 2.27x at 70%,
// 0.86x -> 1.61x at 50% bf16.
// The mask check runs after each row instead of before it (no second pass over the mask): a wrong mask can only
// make a row read values of the rows after it, never past the buffer, as long as its row can hold words * 64
// values (+ the AVX2 expander's over-read) before the end (``nvals``); the last rows, which cannot, are checked first by bitmask_rows. A row that
// fails the check is reported through ``bad`` (the call then raises, its output discarded).
template <typename V>
void bitmask_rows_pairs(const uint64_t* mask, int64_t words, uint64_t tail, const V* vals, int64_t nvals,
                        const int64_t* row_ptr, const float* x, float* out, int64_t r0, int64_t r1, BadRow& bad) {
  constexpr int64_t PREFETCH = 512 / sizeof(V);  // values ahead
  int64_t o = r0;
  for (; o + 2 <= r1 && row_ptr[o + 1] + words * 64 + OVER_READ <= nvals; o += 2) {
    const uint64_t* ma = mask + o * words;
    const uint64_t* mb = ma + words;
    const V* va = vals + row_ptr[o];
    const V* vb = vals + row_ptr[o + 1];
    Acc a0 = zero(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t w = 0; w < words; ++w) {
      _mm_prefetch((const char*)(va + PREFETCH), _MM_HINT_T0);  // never faults, even past the buffer
      _mm_prefetch((const char*)(vb + PREFETCH), _MM_HINT_T0);
      Acc xw[64 / LANES];  // x's 64 columns, loaded once for both rows
      for (int j = 0; j < 64 / LANES; ++j) xw[j] = load(x + 64 * w + LANES * j);
      va += word_fma(va, ma[w], xw, a0, a1);
      vb += word_fma(vb, mb[w], xw, b0, b1);
    }
    if ((words > 0 && ((ma[words - 1] | mb[words - 1]) & ~tail) != 0) || va != vals + row_ptr[o + 1] ||
        vb != vals + row_ptr[o + 2]) {
      bitmask_rows<V, 1, false>(mask, words, tail, vals, row_ptr, x, out, 0, o, o + 2, bad);  // notes the row
      continue;
    }
    out[o] = reduce(a0, a1);
    out[o + 1] = reduce(b0, b1);
  }
  if (o < r1) bitmask_rows<V, 1, false>(mask, words, tail, vals, row_ptr, x, out, 0, o, r1, bad);
}

struct BitmaskArgs {
  const uint64_t* mask;
  int64_t words;
  uint64_t tail;
  int64_t nvals;  // values.numel(), padding included
  const int64_t* row_ptr;
  float* out;
  int64_t rows;
};

template <typename V, bool SKIP>
void bitmask_dispatch(int64_t B, const BitmaskArgs& a, const V* vals, const float* x, float* out, int64_t r0,
                      int64_t r1, BadRow& bad) {
#define SPARSECRAFT_ROWS(n) bitmask_rows<V, n, SKIP>(a.mask, a.words, a.tail, vals, a.row_ptr, x, out, a.rows, r0, r1, bad)
  switch (B) {
    case 1:
      if constexpr (!SKIP)
        return bitmask_rows_pairs<V>(a.mask, a.words, a.tail, vals, a.nvals, a.row_ptr, x, out, r0, r1, bad);
      return SPARSECRAFT_ROWS(1);
    case 2: return SPARSECRAFT_ROWS(2);
    case 3: return SPARSECRAFT_ROWS(3);
    case 4: return SPARSECRAFT_ROWS(4);
    case 5: return SPARSECRAFT_ROWS(5);
    case 6: return SPARSECRAFT_ROWS(6);
    case 7: return SPARSECRAFT_ROWS(7);
    default: return SPARSECRAFT_ROWS(8);
  }
#undef SPARSECRAFT_ROWS
}

// CSR rows: x is transposed and padded to (cols, 8) so one 8-lane load serves all tokens of a column.
// A column index at or past ``cols`` reads column 0 instead and is reported through ``bad`` (its entry index).
template <typename V, typename I>
void csr_rows(const I* col, const V* vals, const int64_t* row_ptr, const float* xt, float* out, int64_t B,
              int64_t out_stride, int64_t r0, int64_t r1, uint32_t cols, BadRow& bad) {
  for (int64_t o = r0; o < r1; ++o) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    uint32_t oob = 0;
    int64_t k = row_ptr[o];
    const int64_t end = row_ptr[o + 1];
    for (; k + 4 <= end; k += 4) {
      uint32_t c0 = (uint32_t)col[k], c1 = (uint32_t)col[k + 1], c2 = (uint32_t)col[k + 2], c3 = (uint32_t)col[k + 3];
      oob |= (c0 >= cols) | (c1 >= cols) | (c2 >= cols) | (c3 >= cols);
      c0 = c0 < cols ? c0 : 0;
      c1 = c1 < cols ? c1 : 0;
      c2 = c2 < cols ? c2 : 0;
      c3 = c3 < cols ? c3 : 0;
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k])), _mm256_loadu_ps(xt + 8 * (int64_t)c0), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 1])), _mm256_loadu_ps(xt + 8 * (int64_t)c1), a1);
      a2 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 2])), _mm256_loadu_ps(xt + 8 * (int64_t)c2), a2);
      a3 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 3])), _mm256_loadu_ps(xt + 8 * (int64_t)c3), a3);
    }
    for (; k < end; ++k) {
      uint32_t c = (uint32_t)col[k];
      oob |= c >= cols;
      c = c < cols ? c : 0;
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k])), _mm256_loadu_ps(xt + 8 * (int64_t)c), a0);
    }
    if (oob)
      for (k = row_ptr[o]; k < end; ++k)
        if ((uint32_t)col[k] >= cols) bad.note(k);
    alignas(32) float s[8];
    _mm256_store_ps(s, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t b = 0; b < B; ++b) out[b * out_stride + o] = s[b];
  }
}

// CSR, one token. AVX2: scalar FMAs, four chains. AVX-512: 16 kept weights per step, x gathered by a masked
// gather whose mask is "column index in bounds", so an out-of-range index reads nothing.
template <typename V, typename I>
void csr_rows_b1(const I* col, const V* vals, const int64_t* row_ptr, const float* x, float* out, int64_t r0,
                 int64_t r1, uint32_t cols, BadRow& bad) {
  for (int64_t o = r0; o < r1; ++o) {
    int64_t k = row_ptr[o];
    const int64_t end = row_ptr[o + 1];
    uint32_t oob = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#ifdef SPARSECRAFT_AVX512
    __m512 acc = _mm512_setzero_ps();
    const __m512i limit = _mm512_set1_epi32((int)cols);
    for (; k + 16 <= end; k += 16) {
      __m512i c;
      if constexpr (sizeof(I) == 2) c = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(col + k)));
      else c = _mm512_loadu_si512((const void*)(col + k));
      const __mmask16 in = _mm512_cmplt_epu32_mask(c, limit);
      oob |= in != 0xffff;
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, c, x, 4);
      __m512 wv;
      if constexpr (sizeof(V) == 4) wv = _mm512_loadu_ps((const float*)(vals + k));
      else wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vals + k))), 16));
      acc = _mm512_fmadd_ps(wv, xv, acc);
    }
    s0 = _mm512_reduce_add_ps(acc);
#endif
    for (; k + 4 <= end; k += 4) {
      uint32_t c0 = (uint32_t)col[k], c1 = (uint32_t)col[k + 1], c2 = (uint32_t)col[k + 2], c3 = (uint32_t)col[k + 3];
      oob |= (c0 >= cols) | (c1 >= cols) | (c2 >= cols) | (c3 >= cols);
      s0 = std::fma(to_f32(vals[k]), x[c0 < cols ? c0 : 0], s0);
      s1 = std::fma(to_f32(vals[k + 1]), x[c1 < cols ? c1 : 0], s1);
      s2 = std::fma(to_f32(vals[k + 2]), x[c2 < cols ? c2 : 0], s2);
      s3 = std::fma(to_f32(vals[k + 3]), x[c3 < cols ? c3 : 0], s3);
    }
    for (; k < end; ++k) {
      const uint32_t c = (uint32_t)col[k];
      oob |= c >= cols;
      s0 = std::fma(to_f32(vals[k]), x[c < cols ? c : 0], s0);
    }
    if (oob)
      for (k = row_ptr[o]; k < end; ++k)
        if ((uint32_t)col[k] >= cols) bad.note(k);
    out[o] = (s0 + s1) + (s2 + s3);
  }
}

// Expand rows [r0, r1) to dense rows of width words * 64 (dense row 0 = weight row r0), stored as D: the values'
// own type, or fp32 (D = float) for the fp32 prefill GEMM of bf16 weights. A row whose mask disagrees with row_ptr
// is reported through ``bad`` and left unwritten.
template <typename V, typename D>
void expand_rows(const uint64_t* mask, int64_t words, uint64_t tail, const V* vals, const int64_t* row_ptr, D* dense,
                 int64_t r0, int64_t r1, int64_t first_row, BadRow& bad) {
  for (int64_t o = r0; o < r1; ++o) {
    const uint64_t* mrow = mask + o * words;
    if (!row_consistent(mrow, words, tail, row_ptr[o + 1] - row_ptr[o])) {
      bad.note(o);
      continue;
    }
    const V* v = vals + row_ptr[o];
    D* d = dense + (o - first_row) * words * 64;
#ifdef SPARSECRAFT_AVX512
    for (int64_t w = 0; w < words; ++w) {
      const Chunks ch(mrow[w]);
      for (int j = 0; j < 4; ++j) {
        D* dst = d + 64 * w + 16 * j;
        if constexpr (sizeof(D) == 4) _mm512_storeu_ps((float*)dst, expand16(v + ch.off[j], ch.m[j]));
        else _mm256_storeu_si256((__m256i*)dst, expand16_bf16(v + ch.off[j], ch.m[j]));
      }
      v += ch.total;
    }
#else
    const uint8_t* bytes = (const uint8_t*)mrow;
    for (int64_t c = 0; c < words * 8; ++c) {
      const __m256 wv = expand(v, bytes[c]);
      v += __builtin_popcount(bytes[c]);
      if constexpr (sizeof(D) == 4) {
        _mm256_storeu_ps((float*)d + 8 * c, wv);
      } else {
        __m256i i = _mm256_srli_epi32(_mm256_castps_si256(wv), 16);
        __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storeu_si128((__m128i*)(d + 8 * c), p);
      }
    }
#endif
  }
}

// Rows per parallel chunk: at least 1M weights each, so layers under 2M weights run on the calling thread alone.
// Measured on the shared 2-core machine: 160 SmolLM2-sized layers (<= 0.9M weights) took 5.6 s with a parallel
// region per call (each region waits for a descheduled worker) and 0.26 s inline; torch's dense GEMV runs
// them single-threaded too.
constexpr int64_t PARALLEL_MIN_WEIGHTS = 1 << 20;
int64_t grain(int64_t rows, int64_t cols) {
  const int64_t by_size = (PARALLEL_MIN_WEIGHTS + cols - 1) / std::max<int64_t>(1, cols);
  return std::max<int64_t>({16, by_size, rows / (8 * std::max(1, at::get_num_threads()))});
}

// x (B, cols) any float dtype -> fp32 (B, width) contiguous, zero padded on the right.
torch::Tensor padded_f32(const torch::Tensor& x, int64_t width) {
  if (x.size(1) == width && x.scalar_type() == torch::kFloat && x.is_contiguous()) return x;
  auto xp = torch::zeros({x.size(0), width}, x.options().dtype(torch::kFloat));
  xp.narrow(1, 0, x.size(1)).copy_(x);
  return xp;
}

// fp32 (B, rows) -> x's dtype and leading shape, plus bias (added in fp32 before rounding, as a dense GEMM does).
torch::Tensor finish(torch::Tensor out, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) out.add_(bias->to(torch::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = out.size(1);
  out = out.view(shape);
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

// mask: int64 (rows, words) bit words, bit c of word w = column 64 w + c; values: (nnz + 8,) fp32/bf16, packed
// row-major, 8 zeros of padding; row_ptr: int64 (rows + 1,); x: (..., cols) -> (..., rows) in x's dtype.
torch::Tensor bitmask_linear(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, int64_t cols,
                             torch::Tensor x, c10::optional<torch::Tensor> bias, bool skip_zero_bytes) {
  check_bitmask(mask, values, row_ptr, cols);
  const auto x2 = check_x(x, cols);
  const int64_t rows = mask.size(0), words = mask.size(1), B = x2.size(0);
  check_bias(bias, rows);
  const auto xp = padded_f32(x2, words * 64);
  auto out = torch::zeros({B, rows}, x.options().dtype(torch::kFloat));
  const BitmaskArgs a{(const uint64_t*)mask.data_ptr<int64_t>(), words, tail_bits(cols), values.numel(),
                      row_ptr.data_ptr<int64_t>(),
                      out.data_ptr<float>(), rows};
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  const void* pv = values.data_ptr();
  const float* px0 = xp.data_ptr<float>();
  BadRow bad;
  // Blocked like a GEMM: each thread takes its rows in blocks of ROW_BLOCK (about 140 KB of packed fp32 weight at
  // 4096 columns, L2-resident) and runs every 8-token group over a block before moving on, so the packed weight
  // is read from memory once however many tokens there are.
  constexpr int64_t ROW_BLOCK = 16;
  at::parallel_for(0, rows, grain(rows, words * 64), [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
      const int64_t re = std::min(rb + ROW_BLOCK, r1);
      for (int64_t b0 = 0; b0 < B; b0 += 8) {
        const int64_t nb = std::min<int64_t>(8, B - b0);
        const float* px = px0 + b0 * words * 64;
        float* pob = a.out + b0 * rows;
        if (bf16 && skip_zero_bytes)
          bitmask_dispatch<uint16_t, true>(nb, a, (const uint16_t*)pv, px, pob, rb, re, bad);
        else if (bf16)
          bitmask_dispatch<uint16_t, false>(nb, a, (const uint16_t*)pv, px, pob, rb, re, bad);
        else if (skip_zero_bytes)
          bitmask_dispatch<float, true>(nb, a, (const float*)pv, px, pob, rb, re, bad);
        else
          bitmask_dispatch<float, false>(nb, a, (const float*)pv, px, pob, rb, re, bad);
      }
    }
  });
  report_bitmask_row(bad, mask, row_ptr, cols);
  return finish(out, x, bias);
}

template <typename V, typename I>
void csr_launch(const I* col, const V* vals, const int64_t* rp, const torch::Tensor& x, float* po, int64_t rows,
                BadRow& bad) {
  const int64_t B = x.size(0), cols = x.size(1);
  if (B == 0) return;
  if (B == 1) {
    const float* px = x.data_ptr<float>();
    at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) {
      csr_rows_b1(col, vals, rp, px, po, r0, r1, (uint32_t)cols, bad);
    });
    return;
  }
  // x as (groups, cols, 8): every 8-token group transposed and zero padded, so one load serves a group's tokens.
  // cols >= 1 here: with no column every row is empty (row_ptr ends at nnz = col.numel() = 0).
  const int64_t groups = (B + 7) / 8;
  auto xt = torch::zeros({groups * 8, std::max<int64_t>(cols, 1)}, x.options());
  xt.narrow(0, 0, B).narrow(1, 0, cols).copy_(x);
  xt = xt.view({groups, 8, xt.size(1)}).transpose(1, 2).contiguous();  // (groups, cols, 8)
  const float* pxt = xt.data_ptr<float>();
  const int64_t xstride = xt.size(1) * 8;
  // Blocked: a block of rows holding about 512 KB of packed weight (L2-sized) runs every token group before the
  // next block, so the weight is read from memory once however many tokens there are, and each group's x (128 KB
  // at 4096 columns) is re-read once per block rather than once per 16 rows.
  const int64_t row_bytes = std::max<int64_t>(1, rp[rows] / std::max<int64_t>(1, rows)) * (sizeof(V) + sizeof(I));
  const int64_t row_block = std::max<int64_t>(16, (512 << 10) / row_bytes);
  at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; rb += row_block) {
      const int64_t re = std::min(rb + row_block, r1);
      for (int64_t g = 0; g < groups; ++g)
        csr_rows(col, vals, rp, pxt + g * xstride, po + g * 8 * rows, std::min<int64_t>(8, B - 8 * g), rows, rb, re,
                 (uint32_t)cols, bad);
    }
  });
}

// col: int16 (read as uint16) or int32 (nnz,); values (nnz,); row_ptr (rows + 1,); x (..., cols) -> (..., rows).
torch::Tensor csr_linear(torch::Tensor col, torch::Tensor values, torch::Tensor row_ptr, int64_t cols, torch::Tensor x,
                         c10::optional<torch::Tensor> bias) {
  check_csr(col, values, row_ptr, cols);
  const int64_t rows = row_ptr.size(0) - 1;
  check_bias(bias, rows);
  const auto x2 = check_x(x, cols);
  const auto xf = padded_f32(x2, cols);
  auto out = torch::zeros({x2.size(0), rows}, xf.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  BadRow bad;
  if (col.scalar_type() == torch::kShort) {
    const auto* c = (const uint16_t*)col.data_ptr<int16_t>();
    if (bf16) csr_launch(c, (const uint16_t*)values.data_ptr(), rp, xf, po, rows, bad);
    else csr_launch(c, values.data_ptr<float>(), rp, xf, po, rows, bad);
  } else {
    const int32_t* c = col.data_ptr<int32_t>();
    if (bf16) csr_launch(c, (const uint16_t*)values.data_ptr(), rp, xf, po, rows, bad);
    else csr_launch(c, values.data_ptr<float>(), rp, xf, po, rows, bad);
  }
  report_csr_entry(bad, col, cols);
  return finish(out, x, bias);
}

// Where an expander writes its (rows, width) dense rows, in the values' dtype or fp32 when to_f32: the first
// rows * width elements of ``out`` when given (a reused prefill tile: no fresh pages to fault in), else a new tensor.
static torch::Tensor expand_target(const c10::optional<torch::Tensor>& out, int64_t rows, int64_t width,
                                   const torch::Tensor& values, bool to_f32) {
  const auto dtype = to_f32 ? torch::kFloat : values.scalar_type();
  if (!out.has_value() || !out->defined()) return torch::empty({rows, width}, values.options().dtype(dtype));
  check_cpu(*out, "out");
  TORCH_CHECK(out->scalar_type() == dtype, "sparsecraft expand: out must be ", dtype, ", got ", out->scalar_type());
  TORCH_CHECK(out->numel() >= rows * width, "sparsecraft expand: out holds ", out->numel(), " elements, the rows need ",
              rows * width);
  return out->view(-1).narrow(0, 0, rows * width).view({rows, width});
}

static void check_row_range(int64_t r0, int64_t r1, int64_t rows) {
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows, "sparsecraft expand: rows [", r0, ", ", r1,
              ") are not inside [0, ", rows, "]");
}

// Bitmask layout rows [r0, r1) -> dense (r1 - r0, words * 64) in the values' dtype, or fp32 when to_f32; written
// into ``out`` when given (see expand_target).
torch::Tensor bitmask_expand(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, int64_t cols, int64_t r0,
                             int64_t r1, bool to_f32, c10::optional<torch::Tensor> out) {
  check_bitmask(mask, values, row_ptr, cols);
  check_row_range(r0, r1, mask.size(0));
  const int64_t words = mask.size(1);
  const uint64_t tail = tail_bits(cols);
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  torch::Tensor dense = expand_target(out, r1 - r0, words * 64, values, to_f32);
  const auto* m = (const uint64_t*)mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  BadRow bad;
  at::parallel_for(r0, r1, grain(r1 - r0, words * 64), [&](int64_t a, int64_t b) {
    if (bf16 && to_f32)
      expand_rows(m, words, tail, (const uint16_t*)values.data_ptr(), rp, dense.data_ptr<float>(), a, b, r0, bad);
    else if (bf16)
      expand_rows(m, words, tail, (const uint16_t*)values.data_ptr(), rp, (uint16_t*)dense.data_ptr(), a, b, r0, bad);
    else
      expand_rows(m, words, tail, values.data_ptr<float>(), rp, dense.data_ptr<float>(), a, b, r0, bad);
  });
  report_bitmask_row(bad, mask, row_ptr, cols);
  return dense;
}

template <typename V, typename I, typename D>
void csr_expand_rows(const I* col, const V* vals, const int64_t* rp, D* dense, int64_t cols, int64_t a, int64_t b,
                     int64_t first_row, BadRow& bad) {
  for (int64_t o = a; o < b; ++o) {
    D* d = dense + (o - first_row) * cols;
    std::memset(d, 0, cols * sizeof(D));
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      const uint32_t c = (uint32_t)col[k];
      if (c >= (uint64_t)cols) {
        bad.note(k);
        continue;
      }
      if constexpr (sizeof(D) == 4) d[c] = to_f32(vals[k]);
      else d[c] = vals[k];
    }
  }
}

template <typename I>
void csr_expand_dispatch(const I* c, const torch::Tensor& values, const int64_t* rp, torch::Tensor& dense,
                         int64_t cols, int64_t r0, int64_t r1, bool to_f32, BadRow& bad) {
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  at::parallel_for(r0, r1, grain(r1 - r0, cols), [&](int64_t a, int64_t b) {
    if (bf16 && to_f32)
      csr_expand_rows(c, (const uint16_t*)values.data_ptr(), rp, dense.data_ptr<float>(), cols, a, b, r0, bad);
    else if (bf16)
      csr_expand_rows(c, (const uint16_t*)values.data_ptr(), rp, (uint16_t*)dense.data_ptr(), cols, a, b, r0, bad);
    else
      csr_expand_rows(c, values.data_ptr<float>(), rp, dense.data_ptr<float>(), cols, a, b, r0, bad);
  });
}

// CSR rows [r0, r1) -> dense (r1 - r0, cols) in the values' dtype, or fp32 when to_f32; into ``out`` when given.
torch::Tensor csr_expand(torch::Tensor col, torch::Tensor values, torch::Tensor row_ptr, int64_t cols, int64_t r0,
                         int64_t r1, bool to_f32, c10::optional<torch::Tensor> out) {
  check_csr(col, values, row_ptr, cols);
  check_row_range(r0, r1, row_ptr.size(0) - 1);
  torch::Tensor dense = expand_target(out, r1 - r0, cols, values, to_f32);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  BadRow bad;
  if (col.scalar_type() == torch::kShort)
    csr_expand_dispatch((const uint16_t*)col.data_ptr<int16_t>(), values, rp, dense, cols, r0, r1, to_f32, bad);
  else
    csr_expand_dispatch(col.data_ptr<int32_t>(), values, rp, dense, cols, r0, r1, to_f32, bad);
  report_csr_entry(bad, col, cols);
  return dense;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.attr("isa") = SPARSECRAFT_ISA;
  mod.def("bitmask_linear", &bitmask_linear, "bitmask-sparse weight (rows, cols) applied to x (B, cols) -> (B, rows)");
  mod.def("csr_linear", &csr_linear, "CSR-sparse weight applied to x (B, cols) -> (B, rows)");
  mod.def("bitmask_expand", &bitmask_expand, "bitmask layout rows [r0, r1) -> dense, padded to 64 columns",
          py::arg("mask"), py::arg("values"), py::arg("row_ptr"), py::arg("cols"), py::arg("r0"), py::arg("r1"),
          py::arg("to_f32"), py::arg("out") = py::none());
  mod.def("csr_expand", &csr_expand, "CSR rows [r0, r1) -> dense", py::arg("col"), py::arg("values"),
          py::arg("row_ptr"), py::arg("cols"), py::arg("r0"), py::arg("r1"), py::arg("to_f32"),
          py::arg("out") = py::none());
}
