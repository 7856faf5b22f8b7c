// Sparse x dense products for CPU decode (1..8 tokens per pass), AVX2 + FMA + F16C.
//
// "Load as sparse, compute as dense": each weight row is a bitmask (64-bit words) plus its packed kept
// values; every 8 columns, one mask byte selects a lookup-table entry that expands the next popcount(byte)
// packed values into a dense 8-lane vector (vpermps + vblendvps for fp32, vpshufb for bf16), which is then
// multiplied densely with the activations. Bytes moved per weight: density * itemsize + 1/8.
// For very sparse rows a CSR variant (uint16/int32 column indices) skips the zeros entirely.
// Threads: at::parallel_for over output rows (torch's own OpenMP pool, so no second runtime).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

#include "expand.h"

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

// out[b, o] = sum_c W[o, c] x[b, c] for rows [r0, r1) and B tokens. x is (B, words * 64) fp32, zero padded.
// A independent accumulators per token hide the FMA latency when B is small.
template <typename V, int B, bool SKIP>
void bitmask_rows(const uint64_t* mask, int64_t words, const V* vals, const int64_t* row_ptr, const float* x,
                  float* out, int64_t out_stride, int64_t r0, int64_t r1) {
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);
  const int64_t xs = words * 64;
  for (int64_t o = r0; o < r1; ++o) {
    const uint64_t* mrow = mask + o * words;
    const V* v = vals + row_ptr[o];
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
  }
}

template <typename V, bool SKIP>
void bitmask_dispatch(int64_t B, const uint64_t* mask, int64_t words, const V* vals, const int64_t* row_ptr,
                      const float* x, float* out, int64_t rows, int64_t r0, int64_t r1) {
  switch (B) {
    case 1: return bitmask_rows<V, 1, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 2: return bitmask_rows<V, 2, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 3: return bitmask_rows<V, 3, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 4: return bitmask_rows<V, 4, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 5: return bitmask_rows<V, 5, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 6: return bitmask_rows<V, 6, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    case 7: return bitmask_rows<V, 7, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
    default: return bitmask_rows<V, 8, SKIP>(mask, words, vals, row_ptr, x, out, rows, r0, r1);
  }
}

// CSR rows: x is transposed and padded to (cols, 8) so one 8-lane load serves all tokens of a column.
template <typename V, typename I>
void csr_rows(const I* col, const V* vals, const int64_t* row_ptr, const float* xt, float* out, int64_t B,
              int64_t out_stride, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = row_ptr[o];
    const int64_t end = row_ptr[o + 1];
    for (; k + 4 <= end; k += 4) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k])), _mm256_loadu_ps(xt + 8 * (int64_t)col[k]), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 1])), _mm256_loadu_ps(xt + 8 * (int64_t)col[k + 1]), a1);
      a2 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 2])), _mm256_loadu_ps(xt + 8 * (int64_t)col[k + 2]), a2);
      a3 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k + 3])), _mm256_loadu_ps(xt + 8 * (int64_t)col[k + 3]), a3);
    }
    for (; k < end; ++k)
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(to_f32(vals[k])), _mm256_loadu_ps(xt + 8 * (int64_t)col[k]), a0);
    alignas(32) float s[8];
    _mm256_store_ps(s, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t b = 0; b < B; ++b) out[b * out_stride + o] = s[b];
  }
}

// CSR, one token: scalar FMAs, four chains.
template <typename V, typename I>
void csr_rows_b1(const I* col, const V* vals, const int64_t* row_ptr, const float* x, float* out, int64_t r0,
                 int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t k = row_ptr[o];
    const int64_t end = row_ptr[o + 1];
    for (; k + 4 <= end; k += 4) {
      s0 = std::fma(to_f32(vals[k]), x[col[k]], s0);
      s1 = std::fma(to_f32(vals[k + 1]), x[col[k + 1]], s1);
      s2 = std::fma(to_f32(vals[k + 2]), x[col[k + 2]], s2);
      s3 = std::fma(to_f32(vals[k + 3]), x[col[k + 3]], s3);
    }
    for (; k < end; ++k) s0 = std::fma(to_f32(vals[k]), x[col[k]], s0);
    out[o] = (s0 + s1) + (s2 + s3);
  }
}

// Expand rows [r0, r1) to dense rows of width words * 64 (dense row 0 = weight row r0), stored as D: the values'
// own type, or fp32 (D = float) for the fp32 prefill GEMM of bf16 weights.
template <typename V, typename D>
void expand_rows(const uint64_t* mask, int64_t words, const V* vals, const int64_t* row_ptr, D* dense, int64_t r0,
                 int64_t r1, int64_t first_row) {
  for (int64_t o = r0; o < r1; ++o) {
    const V* v = vals + row_ptr[o];
    D* d = dense + (o - first_row) * words * 64;
    const uint8_t* bytes = (const uint8_t*)(mask + o * words);
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

void check_common(const torch::Tensor& values, const torch::Tensor& row_ptr) {
  TORCH_CHECK(values.is_contiguous() && row_ptr.is_contiguous(), "sparsecraft kernel: non-contiguous layout");
  TORCH_CHECK(values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kBFloat16,
              "sparsecraft kernel: values must be float32 or bfloat16");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kLong, "sparsecraft kernel: row_ptr must be int64");
}

}  // namespace

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

torch::Tensor rows_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x must have a last dimension of in_features");
  return x.reshape({-1, x.size(-1)});
}

// mask: int64 (rows, words) bit words, bit c of word w = column 64 w + c; values: (nnz + 8,) fp32/bf16, packed
// row-major, 8 zeros of padding; row_ptr: int64 (rows + 1,); x: (..., cols) -> (..., rows) in x's dtype.
torch::Tensor bitmask_linear(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, torch::Tensor x,
                             c10::optional<torch::Tensor> bias, bool skip_zero_bytes) {
  check_common(values, row_ptr);
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == torch::kLong && mask.dim() == 2, "bad mask");
  const auto x2 = rows_of(x);
  TORCH_CHECK(x2.size(1) <= mask.size(1) * 64, "x must be (..., cols)");
  const int64_t rows = mask.size(0), words = mask.size(1), B = x2.size(0);
  const auto xp = padded_f32(x2, words * 64);
  auto out = torch::empty({B, rows}, x.options().dtype(torch::kFloat));
  const auto* m = (const uint64_t*)mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  const void* pv = values.data_ptr();
  const float* px0 = xp.data_ptr<float>();
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
        float* pob = po + b0 * rows;
        if (bf16 && skip_zero_bytes)
          bitmask_dispatch<uint16_t, true>(nb, m, words, (const uint16_t*)pv, rp, px, pob, rows, rb, re);
        else if (bf16)
          bitmask_dispatch<uint16_t, false>(nb, m, words, (const uint16_t*)pv, rp, px, pob, rows, rb, re);
        else if (skip_zero_bytes)
          bitmask_dispatch<float, true>(nb, m, words, (const float*)pv, rp, px, pob, rows, rb, re);
        else
          bitmask_dispatch<float, false>(nb, m, words, (const float*)pv, rp, px, pob, rows, rb, re);
      }
    }
  });
  return finish(out, x, bias);
}

template <typename V, typename I>
void csr_launch(const I* col, const V* vals, const int64_t* rp, const torch::Tensor& x, float* po, int64_t rows) {
  const int64_t B = x.size(0), cols = x.size(1);
  if (B == 1) {
    const float* px = x.data_ptr<float>();
    at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) { csr_rows_b1(col, vals, rp, px, po, r0, r1); });
    return;
  }
  // x as (groups, cols, 8): every 8-token group transposed and zero padded, so one load serves a group's tokens.
  const int64_t groups = (B + 7) / 8;
  auto xt = torch::zeros({groups * 8, cols}, x.options());
  xt.narrow(0, 0, B).copy_(x);
  xt = xt.view({groups, 8, cols}).transpose(1, 2).contiguous();  // (groups, cols, 8)
  const float* pxt = xt.data_ptr<float>();
  // Blocked: a block of rows holding about 512 KB of packed weight (L2-sized) runs every token group before the
  // next block, so the weight is read from memory once however many tokens there are, and each group's x (128 KB
  // at 4096 columns) is re-read once per block rather than once per 16 rows.
  const int64_t row_bytes = std::max<int64_t>(1, rp[rows] / std::max<int64_t>(1, rows)) * (sizeof(V) + sizeof(I));
  const int64_t row_block = std::max<int64_t>(16, (512 << 10) / row_bytes);
  at::parallel_for(0, rows, grain(rows, cols), [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; rb += row_block) {
      const int64_t re = std::min(rb + row_block, r1);
      for (int64_t g = 0; g < groups; ++g)
        csr_rows(col, vals, rp, pxt + g * cols * 8, po + g * 8 * rows, std::min<int64_t>(8, B - 8 * g), rows, rb, re);
    }
  });
}

// col: int16 (read as uint16) or int32 (nnz,); values (nnz,); row_ptr (rows + 1,); x (..., cols) -> (..., rows).
torch::Tensor csr_linear(torch::Tensor col, torch::Tensor values, torch::Tensor row_ptr, torch::Tensor x,
                         c10::optional<torch::Tensor> bias) {
  check_common(values, row_ptr);
  TORCH_CHECK(col.is_contiguous(), "col must be contiguous");
  const int64_t rows = row_ptr.size(0) - 1;
  const auto x2 = rows_of(x);
  const auto xf = padded_f32(x2, x2.size(1));
  auto out = torch::empty({x2.size(0), rows}, xf.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  if (col.scalar_type() == torch::kShort) {
    const auto* c = (const uint16_t*)col.data_ptr<int16_t>();
    if (bf16) csr_launch(c, (const uint16_t*)values.data_ptr(), rp, xf, po, rows);
    else csr_launch(c, values.data_ptr<float>(), rp, xf, po, rows);
  } else {
    TORCH_CHECK(col.scalar_type() == torch::kInt, "col must be int16 or int32");
    const int32_t* c = col.data_ptr<int32_t>();
    if (bf16) csr_launch(c, (const uint16_t*)values.data_ptr(), rp, xf, po, rows);
    else csr_launch(c, values.data_ptr<float>(), rp, xf, po, rows);
  }
  return finish(out, x, bias);
}

// Where an expander writes its (rows, width) dense rows, in the values' dtype or fp32 when to_f32: the first
// rows * width elements of ``out`` when given (a reused prefill tile: no fresh pages to fault in), else a new tensor.
static torch::Tensor expand_target(const c10::optional<torch::Tensor>& out, int64_t rows, int64_t width,
                                   const torch::Tensor& values, bool to_f32) {
  const auto dtype = to_f32 ? torch::kFloat : values.scalar_type();
  if (!out.has_value() || !out->defined()) return torch::empty({rows, width}, values.options().dtype(dtype));
  TORCH_CHECK(out->is_contiguous() && out->scalar_type() == dtype && out->numel() >= rows * width,
              "sparsecraft expand: out must be contiguous, of the output dtype, with room for the rows");
  return out->view(-1).narrow(0, 0, rows * width).view({rows, width});
}

// Bitmask layout rows [r0, r1) -> dense (r1 - r0, words * 64) in the values' dtype, or fp32 when to_f32; written
// into ``out`` when given (see expand_target).
torch::Tensor bitmask_expand(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, int64_t r0, int64_t r1,
                             bool to_f32, c10::optional<torch::Tensor> out) {
  check_common(values, row_ptr);
  const int64_t words = mask.size(1);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= mask.size(0), "bad row range");
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  torch::Tensor dense = expand_target(out, r1 - r0, words * 64, values, to_f32);
  const auto* m = (const uint64_t*)mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  at::parallel_for(r0, r1, grain(r1 - r0, words * 64), [&](int64_t a, int64_t b) {
    if (bf16 && to_f32)
      expand_rows(m, words, (const uint16_t*)values.data_ptr(), rp, dense.data_ptr<float>(), a, b, r0);
    else if (bf16)
      expand_rows(m, words, (const uint16_t*)values.data_ptr(), rp, (uint16_t*)dense.data_ptr(), a, b, r0);
    else
      expand_rows(m, words, values.data_ptr<float>(), rp, dense.data_ptr<float>(), a, b, r0);
  });
  return dense;
}

template <typename V, typename I, typename D>
void csr_expand_rows(const I* col, const V* vals, const int64_t* rp, D* dense, int64_t cols, int64_t a, int64_t b,
                     int64_t first_row) {
  for (int64_t o = a; o < b; ++o) {
    D* d = dense + (o - first_row) * cols;
    std::memset(d, 0, cols * sizeof(D));
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      if constexpr (sizeof(D) == 4) d[col[k]] = to_f32(vals[k]);
      else d[col[k]] = vals[k];
    }
  }
}

template <typename I>
void csr_expand_dispatch(const I* c, const torch::Tensor& values, const int64_t* rp, torch::Tensor& dense,
                         int64_t cols, int64_t r0, int64_t r1, bool to_f32) {
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  at::parallel_for(r0, r1, grain(r1 - r0, cols), [&](int64_t a, int64_t b) {
    if (bf16 && to_f32)
      csr_expand_rows(c, (const uint16_t*)values.data_ptr(), rp, dense.data_ptr<float>(), cols, a, b, r0);
    else if (bf16)
      csr_expand_rows(c, (const uint16_t*)values.data_ptr(), rp, (uint16_t*)dense.data_ptr(), cols, a, b, r0);
    else
      csr_expand_rows(c, values.data_ptr<float>(), rp, dense.data_ptr<float>(), cols, a, b, r0);
  });
}

// CSR rows [r0, r1) -> dense (r1 - r0, cols) in the values' dtype, or fp32 when to_f32; into ``out`` when given.
torch::Tensor csr_expand(torch::Tensor col, torch::Tensor values, torch::Tensor row_ptr, int64_t cols, int64_t r0,
                         int64_t r1, bool to_f32, c10::optional<torch::Tensor> out) {
  check_common(values, row_ptr);
  TORCH_CHECK(col.is_contiguous(), "col must be contiguous");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= row_ptr.size(0) - 1, "bad row range");
  torch::Tensor dense = expand_target(out, r1 - r0, cols, values, to_f32);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  if (col.scalar_type() == torch::kShort)
    csr_expand_dispatch((const uint16_t*)col.data_ptr<int16_t>(), values, rp, dense, cols, r0, r1, to_f32);
  else
    csr_expand_dispatch(col.data_ptr<int32_t>(), values, rp, dense, cols, r0, r1, to_f32);
  return dense;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("bitmask_linear", &bitmask_linear, "bitmask-sparse weight (rows, cols) applied to x (B, cols) -> (B, rows)");
  mod.def("csr_linear", &csr_linear, "CSR-sparse weight applied to x (B, cols) -> (B, rows)");
  mod.def("bitmask_expand", &bitmask_expand, "bitmask layout rows [r0, r1) -> dense, padded to 64 columns",
          py::arg("mask"), py::arg("values"), py::arg("row_ptr"), py::arg("r0"), py::arg("r1"), py::arg("to_f32"),
          py::arg("out") = py::none());
  mod.def("csr_expand", &csr_expand, "CSR rows [r0, r1) -> dense", py::arg("col"), py::arg("values"),
          py::arg("row_ptr"), py::arg("cols"), py::arg("r0"), py::arg("r1"), py::arg("to_f32"),
          py::arg("out") = py::none());
}
