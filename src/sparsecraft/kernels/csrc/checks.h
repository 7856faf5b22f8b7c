// Argument checks shared by every C++ entry point (sparse_cpu.cpp, colsparse_cpu.cpp).
//
// No caller, Python or C++, may hand a kernel an inconsistent layout: a crafted checkpoint or a bug upstream must
// raise a RuntimeError naming the tensor and the fault, never read or write outside a buffer. The checks split by
// cost:
// - O(1) and O(rows) checks run before any kernel work: devices, dtypes, contiguity, shapes, row_ptr starting at 0,
//   monotone and ending at the number of values (and, for the bitmask layout, the 8 values of padding that the AVX2
//   expander may over-read).
// - Checks that touch every mask word or column index are fused into the kernels (see BadRow), so they cost no
//   second pass over the weight: each bitmask row's popcount is taken (from L1, just before the row is expanded)
//   and compared with its row_ptr count before any value is read; each CSR column index is compared with the width
//   before x is read at it. A bad row is skipped and reported once the parallel region ends.
#pragma once
#include <torch/extension.h>
#include <atomic>
#include <cstdint>
#include <string>

namespace {

inline void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "sparsecraft kernel: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "sparsecraft kernel: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "sparsecraft kernel: ", name, " must be contiguous (call .contiguous())");
}

inline void check_values_dtype(const torch::Tensor& values, const char* name) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kBFloat16,
              "sparsecraft kernel: ", name, " must be float32 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1, "sparsecraft kernel: ", name, " must be 1-D, got shape ", values.sizes());
}

// row_ptr int64 (rows + 1,): starts at 0, never decreases, ends at nnz. O(rows).
inline void check_row_ptr(const torch::Tensor& row_ptr, int64_t rows, int64_t nnz) {
  check_cpu(row_ptr, "row_ptr");
  TORCH_CHECK(row_ptr.scalar_type() == torch::kLong, "sparsecraft kernel: row_ptr must be int64, got ",
              row_ptr.scalar_type());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() == rows + 1, "sparsecraft kernel: row_ptr must be (rows + 1,) = (",
              rows + 1, ",), got shape ", row_ptr.sizes());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0, "sparsecraft kernel: row_ptr[0] must be 0, got ", rp[0]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(rp[r] <= rp[r + 1], "sparsecraft kernel: row_ptr must not decrease, but row_ptr[", r, "] = ", rp[r],
                " > row_ptr[", r + 1, "] = ", rp[r + 1]);
  TORCH_CHECK(rp[rows] == nnz, "sparsecraft kernel: row_ptr must end at the number of values ", nnz, ", got ",
              rp[rows]);
}

// Bitmask layout of a (rows, cols) weight: mask int64 (rows, words = ceil(cols / 64)), values (nnz + 8,) fp32/bf16
// (8 zeros of padding), row_ptr (rows + 1,) ending at nnz. The per-row popcounts are checked inside the kernels.
inline void check_bitmask(const torch::Tensor& mask, const torch::Tensor& values, const torch::Tensor& row_ptr,
                          int64_t cols) {
  check_cpu(mask, "mask");
  check_cpu(values, "values");
  TORCH_CHECK(mask.scalar_type() == torch::kLong && mask.dim() == 2,
              "sparsecraft kernel: mask must be int64 (rows, words), got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(cols >= 0 && mask.size(1) == (cols + 63) / 64, "sparsecraft kernel: mask must have ceil(cols / 64) = ",
              (cols + 63) / 64, " words per row for ", cols, " columns, got ", mask.size(1));
  check_values_dtype(values, "values");
  TORCH_CHECK(values.numel() >= 8, "sparsecraft kernel: values must end with 8 values of padding, got ",
              values.numel(), " values");
  check_row_ptr(row_ptr, mask.size(0), values.numel() - 8);
}

// CSR layout: col int16 (uint16 bits) or int32 (nnz,), values (nnz,), row_ptr (rows + 1,) ending at nnz. The
// column bounds are checked inside the kernels.
inline void check_csr(const torch::Tensor& col, const torch::Tensor& values, const torch::Tensor& row_ptr,
                      int64_t cols) {
  check_cpu(col, "col");
  check_cpu(values, "values");
  TORCH_CHECK(col.scalar_type() == torch::kShort || col.scalar_type() == torch::kInt,
              "sparsecraft kernel: col must be int16 (uint16 bits) or int32, got ", col.scalar_type());
  TORCH_CHECK(col.dim() == 1, "sparsecraft kernel: col must be 1-D, got shape ", col.sizes());
  TORCH_CHECK(col.scalar_type() != torch::kShort || cols <= 65536,
              "sparsecraft kernel: int16 column indices hold at most 65536 columns, got ", cols);
  check_values_dtype(values, "values");
  TORCH_CHECK(cols > 0 || values.numel() == 0, "sparsecraft kernel: a layout with 0 columns cannot keep weights");
  TORCH_CHECK(col.numel() == values.numel(), "sparsecraft kernel: col and values must have one entry per kept weight, got ",
              col.numel(), " and ", values.numel());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "sparsecraft kernel: row_ptr must be (rows + 1,)");
  check_row_ptr(row_ptr, row_ptr.numel() - 1, values.numel());
}

// x (..., cols) float on the CPU; returns x as (B, cols).
inline torch::Tensor check_x(const torch::Tensor& x, int64_t cols) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), "sparsecraft kernel: x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ||
                  x.scalar_type() == torch::kHalf,
              "sparsecraft kernel: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "sparsecraft kernel: x must be (..., ", cols, "), got shape ",
              x.sizes());
  return x.reshape({-1, cols});
}

inline void check_bias(const c10::optional<torch::Tensor>& bias, int64_t rows) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->device().is_cpu(), "sparsecraft kernel: bias must be a CPU tensor");
  TORCH_CHECK(bias->is_floating_point(), "sparsecraft kernel: bias must be floating point, got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == rows, "sparsecraft kernel: bias must be (", rows, ",), got shape ",
              bias->sizes());
}

inline int64_t popcount_row(const uint64_t* mrow, int64_t words) {
  int64_t c = 0;
  for (int64_t w = 0; w < words; ++w) c += __builtin_popcountll(mrow[w]);
  return c;
}

// The bits of the last mask word that are real columns (the rest must be 0).
inline uint64_t tail_bits(int64_t cols) {
  return cols % 64 == 0 ? ~uint64_t(0) : (uint64_t(1) << (cols % 64)) - 1;
}

// One bitmask row is consistent: no bit past the last column, popcount == row_ptr count. Read before the row's
// values are touched, so a crafted mask cannot walk the expander past the values.
inline bool row_consistent(const uint64_t* mrow, int64_t words, uint64_t tail, int64_t count) {
  if (words == 0) return count == 0;
  return (mrow[words - 1] & ~tail) == 0 && popcount_row(mrow, words) == count;
}

// The first inconsistent row (or CSR entry) seen by any thread; -1 = none. Reported after the parallel region,
// because TORCH_CHECK must not throw across at::parallel_for's worker threads.
struct BadRow {
  std::atomic<int64_t> index{-1};
  void note(int64_t i) {
    int64_t none = -1;
    index.compare_exchange_strong(none, i, std::memory_order_relaxed);
  }
  bool seen() const { return index.load(std::memory_order_relaxed) >= 0; }
};

inline void report_bitmask_row(const BadRow& bad, const torch::Tensor& mask, const torch::Tensor& row_ptr,
                               int64_t cols) {
  if (!bad.seen()) return;
  const int64_t r = bad.index.load(), words = mask.size(1);
  const auto* mrow = (const uint64_t*)mask.data_ptr<int64_t>() + r * words;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(words == 0 || (mrow[words - 1] & ~tail_bits(cols)) == 0, "sparsecraft kernel: mask row ", r,
              " has bits set past column ", cols);
  TORCH_CHECK(false, "sparsecraft kernel: mask row ", r, " keeps ", popcount_row(mrow, words),
              " weights but row_ptr gives it ", rp[r + 1] - rp[r], " values");
}

inline void report_csr_entry(const BadRow& bad, const torch::Tensor& col, int64_t cols) {
  if (!bad.seen()) return;
  const int64_t k = bad.index.load();
  const int64_t c = col.scalar_type() == torch::kShort ? (int64_t)(uint16_t)col.data_ptr<int16_t>()[k]
                                                       : (int64_t)col.data_ptr<int32_t>()[k];
  TORCH_CHECK(false, "sparsecraft kernel: col[", k, "] = ", c, " is not a column index below the width ", cols);
}

}  // namespace
