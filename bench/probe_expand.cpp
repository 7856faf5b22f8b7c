// Throwaway probe (bench/probe_expand.py): variants of the AVX-512 bitmask GEMV inner loop, batch 1, fp32/bf16.
// Not part of the package: the winner goes into src/sparsecraft/kernels/csrc/sparse_cpu.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

inline __mmask16 first_n(unsigned m) { return (__mmask16)_bzhi_u32(0xffffu, (unsigned)__builtin_popcount(m)); }

template <int VAR>
inline __m512 ex(const float* v, unsigned m) {
  if constexpr (VAR == 1) return _mm512_maskz_expandloadu_ps((__mmask16)m, v);
  else return _mm512_maskz_expand_ps((__mmask16)m, _mm512_maskz_loadu_ps(first_n(m), v));
}
template <int VAR>
inline __m512 ex(const uint16_t* v, unsigned m) {
  __m256i h;
  if constexpr (VAR == 1) h = _mm256_maskz_expandloadu_epi16((__mmask16)m, v);
  else h = _mm256_maskz_expand_epi16((__mmask16)m, _mm256_maskz_loadu_epi16(first_n(m), v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// VAR 0: register expand (the current kernel), 1: memory-form expandload; PF: prefetch distance in bytes (0 = off)
template <typename V, int VAR, int PF>
void rows(const uint64_t* mask, int64_t words, const V* vals, const int64_t* rp, const float* x, float* out,
          int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    const uint64_t* mrow = mask + o * words;
    const V* v = vals + rp[o];
    if constexpr (PF > 0) {
      _mm_prefetch((const char*)(mask + (o + 2) * words), _MM_HINT_T0);
      _mm_prefetch((const char*)(mask + (o + 2) * words) + 64, _MM_HINT_T0);
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const uint64_t m = mrow[w];
      if constexpr (PF > 0) _mm_prefetch((const char*)v + PF, _MM_HINT_T0);
      const unsigned m0 = m & 0xffff, m1 = (m >> 16) & 0xffff, m2 = (m >> 32) & 0xffff, m3 = m >> 48;
      const int64_t o1 = __builtin_popcountll(m & 0xffffull), o2 = __builtin_popcountll(m & 0xffffffffull),
                    o3 = __builtin_popcountll(m & 0xffffffffffffull);
      const float* xw = x + 64 * w;
      a0 = _mm512_fmadd_ps(ex<VAR>(v, m0), _mm512_loadu_ps(xw), a0);
      a1 = _mm512_fmadd_ps(ex<VAR>(v + o1, m1), _mm512_loadu_ps(xw + 16), a1);
      a2 = _mm512_fmadd_ps(ex<VAR>(v + o2, m2), _mm512_loadu_ps(xw + 32), a2);
      a3 = _mm512_fmadd_ps(ex<VAR>(v + o3, m3), _mm512_loadu_ps(xw + 48), a3);
      v += __builtin_popcountll(m);
    }
    out[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

// Two rows per step: two independent value streams in flight.
template <typename V, int VAR, int PF = 0>
void rows2(const uint64_t* mask, int64_t words, const V* vals, const int64_t* rp, const float* x, float* out,
           int64_t r0, int64_t r1) {
  int64_t o = r0;
  for (; o + 2 <= r1; o += 2) {
    const uint64_t* ma = mask + o * words;
    const uint64_t* mb = ma + words;
    const V* va = vals + rp[o];
    const V* vb = vals + rp[o + 1];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t w = 0; w < words; ++w) {
      const uint64_t m = ma[w], n = mb[w];
      if constexpr (PF > 0) {
        _mm_prefetch((const char*)va + PF, _MM_HINT_T0);
        _mm_prefetch((const char*)vb + PF, _MM_HINT_T0);
      }
      const float* xw = x + 64 * w;
      const __m512 x0 = _mm512_loadu_ps(xw), x1 = _mm512_loadu_ps(xw + 16), x2 = _mm512_loadu_ps(xw + 32),
                   x3 = _mm512_loadu_ps(xw + 48);
      a0 = _mm512_fmadd_ps(ex<VAR>(va, m & 0xffff), x0, a0);
      a1 = _mm512_fmadd_ps(ex<VAR>(va + __builtin_popcountll(m & 0xffffull), (m >> 16) & 0xffff), x1, a1);
      a0 = _mm512_fmadd_ps(ex<VAR>(va + __builtin_popcountll(m & 0xffffffffull), (m >> 32) & 0xffff), x2, a0);
      a1 = _mm512_fmadd_ps(ex<VAR>(va + __builtin_popcountll(m & 0xffffffffffffull), m >> 48), x3, a1);
      b0 = _mm512_fmadd_ps(ex<VAR>(vb, n & 0xffff), x0, b0);
      b1 = _mm512_fmadd_ps(ex<VAR>(vb + __builtin_popcountll(n & 0xffffull), (n >> 16) & 0xffff), x1, b1);
      b0 = _mm512_fmadd_ps(ex<VAR>(vb + __builtin_popcountll(n & 0xffffffffull), (n >> 32) & 0xffff), x2, b0);
      b1 = _mm512_fmadd_ps(ex<VAR>(vb + __builtin_popcountll(n & 0xffffffffffffull), n >> 48), x3, b1);
      va += __builtin_popcountll(m);
      vb += __builtin_popcountll(n);
    }
    out[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    out[o + 1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  }
  if (o < r1) rows<V, VAR, 0>(mask, words, vals, rp, x, out, o, r1);
}

// Dense AVX-512 GEMV, for the bandwidth a plain streaming loop reaches.
void dense_rows(const float* W, int64_t cols, const float* x, float* out, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    const float* w = W + o * cols;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < cols; c += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
    }
    out[o] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}

template <typename V>
void run(int64_t variant, const uint64_t* m, int64_t words, const V* v, const int64_t* rp, const float* x, float* o,
         int64_t a, int64_t b) {
  switch (variant) {
    case 0: return rows<V, 0, 0>(m, words, v, rp, x, o, a, b);
    case 1: return rows<V, 1, 0>(m, words, v, rp, x, o, a, b);
    case 2: return rows<V, 0, 512>(m, words, v, rp, x, o, a, b);
    case 3: return rows<V, 1, 512>(m, words, v, rp, x, o, a, b);
    case 4: return rows2<V, 0>(m, words, v, rp, x, o, a, b);
    case 5: return rows2<V, 1>(m, words, v, rp, x, o, a, b);
    case 6: return rows<V, 0, 1024>(m, words, v, rp, x, o, a, b);
    case 7: return rows2<V, 1, 512>(m, words, v, rp, x, o, a, b);
    default: return rows2<V, 1, 1024>(m, words, v, rp, x, o, a, b);
  }
}

}  // namespace

// x (cols,) fp32 with cols % 64 == 0 -> (rows,)
torch::Tensor gemv(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, torch::Tensor x, int64_t variant,
                   int64_t grain) {
  const int64_t rows = mask.size(0), words = mask.size(1);
  auto out = torch::empty({rows}, x.options());
  const auto* m = (const uint64_t*)mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    if (bf16) run(variant, m, words, (const uint16_t*)values.data_ptr(), rp, px, po, a, b);
    else run(variant, m, words, values.data_ptr<float>(), rp, px, po, a, b);
  });
  return out;
}

torch::Tensor dense_gemv(torch::Tensor w, torch::Tensor x, int64_t grain) {
  const int64_t rows = w.size(0), cols = w.size(1);
  auto out = torch::empty({rows}, x.options());
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    dense_rows(w.data_ptr<float>(), cols, x.data_ptr<float>(), out.data_ptr<float>(), a, b);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gemv", &gemv);
  mod.def("dense_gemv", &dense_gemv);
}
