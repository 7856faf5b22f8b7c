// Activation-sparse GEMV for batch-1 CPU decoding, AVX2 + FMA (no AVX-512 needed).
//
// y = W x where most inputs x_j are zeroed by a threshold: keep j when |x_j| * scale_j > threshold. The weight is
// stored TRANSPOSED, wt (in, out) row-major, so the column W[:, j] needed by a kept input is one contiguous row of wt
// and a skipped input is a skipped run of out * itemsize bytes: the bytes read are density * the dense bytes.
//
// Work split: the kept inputs are cut into one contiguous chunk per thread (equal counts); each thread streams its
// rows of wt (long contiguous reads that the hardware prefetcher follows) into a private fp32 accumulator of `out`
// floats, 4 rows per pass over the accumulator so it is loaded and stored once per 4 weight rows; the partial sums
// are then added (threads * out floats, negligible next to the weight). Threads: torch's own pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "expand.h"

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32 (bf16 is the high half of an fp32)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t u = (uint32_t)(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// acc[0:out] += sum over k in [k0, k1) of xv[k] * wt[idx[k], 0:out]
template <typename V>
void accumulate(const V* wt, int64_t out, const int32_t* idx, const float* xv, int64_t k0, int64_t k1, float* acc) {
  const int64_t vec_end = out - out % 8;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const V* w0 = wt + (int64_t)idx[k] * out;
    const V* w1 = wt + (int64_t)idx[k + 1] * out;
    const V* w2 = wt + (int64_t)idx[k + 2] * out;
    const V* w3 = wt + (int64_t)idx[k + 3] * out;
    const __m256 x0 = _mm256_set1_ps(xv[k]), x1 = _mm256_set1_ps(xv[k + 1]);
    const __m256 x2 = _mm256_set1_ps(xv[k + 2]), x3 = _mm256_set1_ps(xv[k + 3]);
    for (int64_t o = 0; o < vec_end; o += 8) {
      __m256 a = _mm256_loadu_ps(acc + o);
      __m256 b = _mm256_mul_ps(x1, load8(w1 + o));
      a = _mm256_fmadd_ps(x0, load8(w0 + o), a);
      b = _mm256_fmadd_ps(x3, load8(w3 + o), b);
      a = _mm256_fmadd_ps(x2, load8(w2 + o), a);
      _mm256_storeu_ps(acc + o, _mm256_add_ps(a, b));
    }
    for (int64_t o = vec_end; o < out; ++o)
      acc[o] += xv[k] * load1(w0 + o) + xv[k + 1] * load1(w1 + o) + xv[k + 2] * load1(w2 + o) +
                xv[k + 3] * load1(w3 + o);
  }
  for (; k < k1; ++k) {
    const V* w0 = wt + (int64_t)idx[k] * out;
    const __m256 x0 = _mm256_set1_ps(xv[k]);
    for (int64_t o = 0; o < vec_end; o += 8)
      _mm256_storeu_ps(acc + o, _mm256_fmadd_ps(x0, load8(w0 + o), _mm256_loadu_ps(acc + o)));
    for (int64_t o = vec_end; o < out; ++o) acc[o] += xv[k] * load1(w0 + o);
  }
}

// Kept inputs: j with |x_j| * scale_j > threshold (scale may be null = all ones). Returns their count.
// Branch-free: every j is written and the count advances by the predicate (about half the inputs are kept, so a
// branch would mispredict on every other one).
int64_t select(const float* x, const float* scale, int64_t in, float threshold, int32_t* idx, float* xv) {
  int64_t n = 0;
  for (int64_t j = 0; j < in; ++j) {
    const float s = std::abs(x[j]) * (scale ? scale[j] : 1.0f);
    idx[n] = (int32_t)j;
    xv[n] = x[j];
    n += s > threshold;
  }
  return n;
}

template <typename V>
void gemv(const V* wt, int64_t in, int64_t out, const float* x, const float* scale, float threshold,
          const float* bias, float* y) {
  std::vector<int32_t> idx(in);
  std::vector<float> xv(in);
  const int64_t nnz = select(x, scale, in, threshold, idx.data(), xv.data());
  // A second thread only for at least 2^21 weights (8 MB fp32) per thread: measured on 2 busy cores, fork/join next
  // to torch's own OpenMP pool cost up to milliseconds, while one thread already streams a SmolLM2-sized layer
  // (0.9-1.8 MB) at 1.4-1.6x dense.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nnz * out >> 21));
  std::vector<float> partial(parts * out, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      accumulate(wt, out, idx.data(), xv.data(), nnz * p / parts, nnz * (p + 1) / parts, partial.data() + p * out);
  });
  for (int64_t o = 0; o < out; ++o) {
    float s = bias ? bias[o] : 0.0f;
    for (int64_t p = 0; p < parts; ++p) s += partial[p * out + o];
    y[o] = s;
  }
}

// Joint weight + activation sparsity: the transposed weight is bitmask-packed (row j = column W[:, j], one bit per
// output, the kept values packed), so a skipped input skips its row and a kept input reads only its kept weights:
// acc[0:words*64] += sum over k in [k0, k1) of xv[k] * expand(row idx[k]). Four inputs per pass over acc.
template <typename V>
void accumulate_bitmask(const uint64_t* mask, int64_t words, const V* vals, const int64_t* row_ptr,
                        const int32_t* idx, const float* xv, int64_t k0, int64_t k1, float* acc) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {  // four inputs per pass: one load and one store of acc per 4 expansions
    const uint8_t* m0 = (const uint8_t*)(mask + (int64_t)idx[k] * words);
    const uint8_t* m1 = (const uint8_t*)(mask + (int64_t)idx[k + 1] * words);
    const uint8_t* m2 = (const uint8_t*)(mask + (int64_t)idx[k + 2] * words);
    const uint8_t* m3 = (const uint8_t*)(mask + (int64_t)idx[k + 3] * words);
    const V* v0 = vals + row_ptr[idx[k]];
    const V* v1 = vals + row_ptr[idx[k + 1]];
    const V* v2 = vals + row_ptr[idx[k + 2]];
    const V* v3 = vals + row_ptr[idx[k + 3]];
    const __m256 x0 = _mm256_set1_ps(xv[k]), x1 = _mm256_set1_ps(xv[k + 1]);
    const __m256 x2 = _mm256_set1_ps(xv[k + 2]), x3 = _mm256_set1_ps(xv[k + 3]);
    for (int64_t c = 0; c < words * 8; ++c) {
      const unsigned b0 = m0[c], b1 = m1[c], b2 = m2[c], b3 = m3[c];
      __m256 a = _mm256_fmadd_ps(x0, expand(v0, b0), _mm256_loadu_ps(acc + 8 * c));
      __m256 b = _mm256_mul_ps(x1, expand(v1, b1));
      a = _mm256_fmadd_ps(x2, expand(v2, b2), a);
      b = _mm256_fmadd_ps(x3, expand(v3, b3), b);
      _mm256_storeu_ps(acc + 8 * c, _mm256_add_ps(a, b));
      v0 += __builtin_popcount(b0);
      v1 += __builtin_popcount(b1);
      v2 += __builtin_popcount(b2);
      v3 += __builtin_popcount(b3);
    }
  }
  for (; k < k1; ++k) {
    const uint8_t* m0 = (const uint8_t*)(mask + (int64_t)idx[k] * words);
    const V* v0 = vals + row_ptr[idx[k]];
    const __m256 x0 = _mm256_set1_ps(xv[k]);
    for (int64_t c = 0; c < words * 8; ++c) {
      const unsigned b0 = m0[c];
      _mm256_storeu_ps(acc + 8 * c, _mm256_fmadd_ps(x0, expand(v0, b0), _mm256_loadu_ps(acc + 8 * c)));
      v0 += __builtin_popcount(b0);
    }
  }
}

template <typename V>
void gemv_bitmask(const uint64_t* mask, int64_t in, int64_t words, int64_t out, const V* vals, const int64_t* row_ptr,
                  int64_t nnz_w, const float* x, const float* scale, float threshold, const float* bias, float* y,
                  BadRow& bad) {
  std::vector<int32_t> idx(in);
  std::vector<float> xv(in);
  const int64_t nnz = select(x, scale, in, threshold, idx.data(), xv.data());
  // Every row about to be read must agree with row_ptr (checks.h); the rows of skipped inputs are never read.
  const uint64_t tail = tail_bits(out);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t j = idx[k];
    if (!row_consistent(mask + j * words, words, tail, row_ptr[j + 1] - row_ptr[j])) {
      bad.note(j);
      return;
    }
  }
  // Same thread rule as gemv, counted in kept weights actually read.
  const int64_t read = in ? nnz_w * nnz / in : 0;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), read >> 21));
  const int64_t width = words * 64;
  std::vector<float> partial(parts * width, 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      accumulate_bitmask(mask, words, vals, row_ptr, idx.data(), xv.data(), nnz * p / parts, nnz * (p + 1) / parts,
                         partial.data() + p * width);
  });
  for (int64_t o = 0; o < out; ++o) {
    float s = bias ? bias[o] : 0.0f;
    for (int64_t p = 0; p < parts; ++p) s += partial[p * width + o];
    y[o] = s;
  }
}

// Checks x (in,) fp32 and the optional scale (in,) fp32 (empty = all ones); -> the scale pointer or null.
const float* scale_ptr(const torch::Tensor& x, const torch::Tensor& scale, int64_t in) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.numel() == in, "sparsecraft kernel: x must be fp32 (", in,
              ",), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(scale.device().is_cpu(), "sparsecraft kernel: scale must be a CPU tensor");
  TORCH_CHECK(scale.numel() == 0 || (scale.scalar_type() == torch::kFloat && scale.is_contiguous() &&
                                     scale.numel() == in), "sparsecraft kernel: scale must be empty or fp32 (", in, ",)");
  return scale.numel() ? scale.data_ptr<float>() : nullptr;
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t out) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == out, "sparsecraft kernel: bias must be fp32 (",
              out, ",)");
  return bias->data_ptr<float>();
}

}  // namespace

// The bitmask layout of W.T: mask int64 (in, words) with bit o of row j = W[o, j] kept, values (nnz + 8,) fp32 or
// bf16 packed row-major then 8 zeros, row_ptr int64 (in + 1,); out = W's rows; x, scale, bias as colsparse_gemv.
torch::Tensor colsparse_bitmask_gemv(torch::Tensor mask, torch::Tensor values, torch::Tensor row_ptr, int64_t out,
                                     torch::Tensor x, torch::Tensor scale, double threshold,
                                     c10::optional<torch::Tensor> bias) {
  check_bitmask(mask, values, row_ptr, out);  // W.T: rows = inputs, columns = the `out` outputs
  const int64_t in = mask.size(0), words = mask.size(1);
  const float* ps = scale_ptr(x, scale, in);
  const float* pb = bias_ptr(bias, out);
  auto y = torch::empty({out}, x.options());
  const auto* m = (const uint64_t*)mask.data_ptr<int64_t>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t nnz_w = rp[in];
  BadRow bad;
  if (values.scalar_type() == torch::kBFloat16)
    gemv_bitmask(m, in, words, out, (const uint16_t*)values.data_ptr(), rp, nnz_w, x.data_ptr<float>(), ps,
                 (float)threshold, pb, y.data_ptr<float>(), bad);
  else
    gemv_bitmask(m, in, words, out, values.data_ptr<float>(), rp, nnz_w, x.data_ptr<float>(), ps, (float)threshold, pb,
                 y.data_ptr<float>(), bad);
  report_bitmask_row(bad, mask, row_ptr, out);
  return y;
}

// wt (in, out) fp32 or bf16, contiguous; x (in,) fp32; scale (in,) fp32 or empty; bias (out,) fp32 or None.
// -> y (out,) fp32 = W @ (x where |x| * scale > threshold, else 0) + bias.
torch::Tensor colsparse_gemv(torch::Tensor wt, torch::Tensor x, torch::Tensor scale, double threshold,
                             c10::optional<torch::Tensor> bias) {
  check_cpu(wt, "wt");
  TORCH_CHECK(wt.dim() == 2, "sparsecraft kernel: wt must be an (in, out) matrix, got shape ", wt.sizes());
  TORCH_CHECK(wt.scalar_type() == torch::kFloat || wt.scalar_type() == torch::kBFloat16, "wt must be fp32 or bf16");
  const int64_t in = wt.size(0), out = wt.size(1);
  const float* ps = scale_ptr(x, scale, in);
  const float* pb = bias_ptr(bias, out);
  auto y = torch::empty({out}, x.options());
  if (wt.scalar_type() == torch::kBFloat16)
    gemv((const uint16_t*)wt.data_ptr(), in, out, x.data_ptr<float>(), ps, (float)threshold, pb, y.data_ptr<float>());
  else
    gemv(wt.data_ptr<float>(), in, out, x.data_ptr<float>(), ps, (float)threshold, pb, y.data_ptr<float>());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("colsparse_gemv", &colsparse_gemv, "activation-sparse GEMV over a transposed weight (AVX2)");
  mod.def("colsparse_bitmask_gemv", &colsparse_bitmask_gemv,
          "activation-sparse GEMV over a bitmask-packed transposed weight (weight + activation sparsity, AVX2)");
}
