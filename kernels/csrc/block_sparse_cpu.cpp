// Block-sparse flash attention forward for CPU tensors, registered as torch.ops.diffsparse_cpu.forward.
//
// Why not torch's own fused op on gathered keys: it picks its query tile from the query length it is given
// (32 rows below 192 queries), so one 64/128-query block per call runs its GEMMs at a fraction of the width
// dense attention gets. Here each task is one (batch, head, query block), and its GEMMs span the whole query
// block and up to kKeyTile keys: runs of consecutive kept key blocks are read in place, scattered ones are
// copied side by side first. Measured on 2 cores (README): efficiency 0.90-0.93 on random masks at block 128,
// against 0.82-0.83 for the fused op on gathered keys.
//
// at::vec picks its SIMD width from the CPU_CAPABILITY_* macro the loader defines from torch's own choice.
// GEMMs go to the BLAS torch links (MKL on x86 wheels: sgemm_, cblas_gemm_bf16bf16f32). A torch without those
// symbols fails to load this library and kernels/cpu.py keeps its portable path.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc);
}

namespace {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;
// Keys per GEMM, as in torch's dense CPU flash kernel, so sparse and dense tiles match.
constexpr int64_t kKeyTile = 512;

// Row-major C(m x n) = alpha * A(m x k) * op(B) + beta * C, where op(B) is B (k x n) or, with trans_b,
// B^T for B stored (n x k). Fortran BLAS is column-major, so it computes C^T = op(B)^T * A^T.
void gemm(bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
          float beta, float* c, int ldc) {
  const char tb = trans_b ? 'T' : 'N', ta = 'N';
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

void gemm(bool trans_b, int m, int n, int k, float alpha, const c10::BFloat16* a, int lda,
          const c10::BFloat16* b, int ldb, float beta, float* c, int ldc) {
  cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans, m, n, k, alpha,
                         reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb,
                         beta, c, ldc);
}

using Vec = at::vec::Vectorized<float>;

// exp(x - shift) over a row, in place; returns the row sum. exp_u20 is torch's fast exp (<= 20 ulp), the one
// its own flash kernel uses for the same job.
float exp_row(float* row, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec x = (Vec::loadu(row + j) - vshift).exp_u20();
    x.store(row + j);
    vsum += x;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < n; ++j) sum += (row[j] = std::exp(row[j] - shift));
  return sum;
}

float max_row(const float* row, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, n);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_indices,
                    const at::Tensor& kv_counts, int64_t block_q, int64_t block_k, double scale, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_len = k.size(2);
  const int64_t nq = kv_indices.size(2), nk = kv_indices.size(3);
  const int64_t idx_b = kv_indices.size(0) == 1 ? 0 : 1, idx_h = kv_indices.size(1) == 1 ? 0 : 1;
  const scalar_t *q_ptr = q.const_data_ptr<scalar_t>(), *k_ptr = k.const_data_ptr<scalar_t>(),
                 *v_ptr = v.const_data_ptr<scalar_t>();
  const int32_t* idx_ptr = kv_indices.const_data_ptr<int32_t>();
  const int32_t* cnt_ptr = kv_counts.const_data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const int64_t tile = std::max<int64_t>(kKeyTile, block_k);
  constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;

  at::parallel_for(0, batch * heads * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(block_q * tile), acc(block_q * dim), row_max(block_q), row_sum(block_q);
    std::vector<scalar_t> probs(kIsFloat ? 0 : block_q * tile), k_tile(tile * dim), v_tile(tile * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * nq), h = task / nq % heads, qb = task % nq;
      const int64_t q0 = qb * block_q, m = std::min(block_q, q_len - q0);
      const scalar_t* qs = q_ptr + b * q.stride(0) + h * q.stride(1) + q0 * q.stride(2);
      const scalar_t* ks = k_ptr + b * k.stride(0) + h * k.stride(1);
      const scalar_t* vs = v_ptr + b * v.stride(0) + h * v.stride(1);
      const int64_t row = ((b * idx_b) * kv_indices.size(1) + h * idx_h) * nq + qb;
      const int32_t* blocks = idx_ptr + row * nk;
      const int64_t count = cnt_ptr[row];
      std::fill_n(acc.begin(), m * dim, 0.f);
      std::fill_n(row_max.begin(), m, -std::numeric_limits<float>::infinity());
      std::fill_n(row_sum.begin(), m, 0.f);

      for (int64_t i = 0; i < count;) {
        // Up to `tile` keys per GEMM pair: a run of consecutive blocks is read in place, scattered blocks are
        // first copied side by side (cheap next to the GEMMs, and it keeps them as wide as dense attention's).
        int64_t j = i + 1;
        bool contiguous = true;
        for (; j < count && (j - i + 1) * block_k <= tile; ++j) contiguous &= blocks[j] == blocks[j - 1] + 1;
        const scalar_t *kt, *vt;
        int64_t n = 0, ldk, ldv;
        if (contiguous) {
          const int64_t k0 = blocks[i] * block_k;
          n = std::min((j - i) * block_k, kv_len - k0);
          kt = ks + k0 * k.stride(2), vt = vs + k0 * v.stride(2), ldk = k.stride(2), ldv = v.stride(2);
        } else {
          for (int64_t c = i; c < j; ++c) {
            const int64_t k0 = blocks[c] * block_k, rows = std::min(block_k, kv_len - k0);
            for (int64_t r = 0; r < rows; ++r, ++n) {
              std::memcpy(k_tile.data() + n * dim, ks + (k0 + r) * k.stride(2), dim * sizeof(scalar_t));
              std::memcpy(v_tile.data() + n * dim, vs + (k0 + r) * v.stride(2), dim * sizeof(scalar_t));
            }
          }
          kt = k_tile.data(), vt = v_tile.data(), ldk = dim, ldv = dim;
        }
        i = j;
        gemm(true, m, n, dim, static_cast<float>(scale), qs, q.stride(2), kt, ldk, 0.f, scores.data(), n);
        for (int64_t r = 0; r < m; ++r) {
          float* s = scores.data() + r * n;
          const float new_max = std::max(row_max[r], max_row(s, n));
          const float correction = std::exp(row_max[r] - new_max);  // exp(-inf) = 0 on the first tile
          row_sum[r] = row_sum[r] * correction + exp_row(s, n, new_max);
          row_max[r] = new_max;
          float* a = acc.data() + r * dim;
          at::vec::map([correction](Vec x) { return x * Vec(correction); }, a, a, dim);
          if constexpr (!kIsFloat) at::vec::convert(s, probs.data() + r * n, n);
        }
        const scalar_t* p = kIsFloat ? reinterpret_cast<const scalar_t*>(scores.data()) : probs.data();
        gemm(false, m, dim, n, 1.f, p, n, vt, ldv, 1.f, acc.data(), dim);
      }

      scalar_t* os = out_ptr + ((b * heads + h) * q_len + q0) * dim;
      float* ls = lse_ptr + (b * heads + h) * q_len + q0;
      for (int64_t r = 0; r < m; ++r) {
        float* a = acc.data() + r * dim;
        const float inv = 1.f / row_sum[r];
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, a, a, dim);
        at::vec::convert(a, os + r * dim, dim);
        ls[r] = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                                           int64_t block_q, int64_t block_k, double scale) {
  // kernels/attention.py validates shapes, devices and the plan with named errors before it calls this op; the
  // op is registered and callable directly, though, so everything this code indexes by is checked here too, and a
  // wrong call fails instead of reading or writing outside its tensors. The plan pass is O(plan), small next to
  // the attention it plans.
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && kv_indices.device().is_cpu() &&
                  kv_counts.device().is_cpu(),
              "all tensors must be on the CPU");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  for (int d : {0, 1, 3})
    TORCH_CHECK(k.size(d) == q.size(d) && v.size(d) == q.size(d), "q, k, v must agree in B, H and D, got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(2) == v.size(2), "k and v must have one length, got ", k.size(2), " and ", v.size(2));
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head dim must be contiguous");
  // BLAS refuses a leading dimension below D (and then computes nothing).
  TORCH_CHECK(q.stride(2) >= q.size(3) && k.stride(2) >= k.size(3) && v.stride(2) >= v.size(3),
              "token stride must be >= head dim");
  TORCH_CHECK(kv_indices.scalar_type() == at::kInt && kv_counts.scalar_type() == at::kInt &&
                  kv_indices.is_contiguous() && kv_counts.is_contiguous(),
              "contiguous int32 plan tensors");
  TORCH_CHECK(block_q >= 1 && block_k >= 1, "block sizes must be >= 1, got ", block_q, ", ", block_k);
  TORCH_CHECK(kv_indices.dim() == 4 && kv_counts.dim() == 3 && kv_counts.sizes() == kv_indices.sizes().slice(0, 3),
              "kv_indices must be (B|1, H|1, query blocks, key blocks) and kv_counts its first three, got ",
              kv_indices.sizes(), ", ", kv_counts.sizes());
  TORCH_CHECK((kv_indices.size(0) == 1 || kv_indices.size(0) == q.size(0)) &&
                  (kv_indices.size(1) == 1 || kv_indices.size(1) == q.size(1)),
              "plan batch and heads must be 1 or the inputs', got ", kv_indices.sizes(), " for ", q.sizes());
  const int64_t nq = kv_indices.size(2), nk = kv_indices.size(3);
  TORCH_CHECK(nq == (q.size(2) + block_q - 1) / block_q && nk == (k.size(2) + block_k - 1) / block_k,
              "plan of ", nq, " x ", nk, " blocks does not cover ", q.size(2), " queries x ", k.size(2),
              " keys in blocks of ", block_q, " x ", block_k);
  const int32_t* idx = kv_indices.const_data_ptr<int32_t>();
  const int32_t* cnt = kv_counts.const_data_ptr<int32_t>();
  for (int64_t row = 0; row < kv_counts.numel(); ++row) {
    // A query block keeping no key block has no softmax: its rows would be 0/0 (NaN) with lse -inf.
    TORCH_CHECK(cnt[row] >= 1 && cnt[row] <= nk, "kv_counts must be in [1, ", nk, "], got ", cnt[row]);
    for (int64_t i = 0; i < cnt[row]; ++i)
      TORCH_CHECK(idx[row * nk + i] >= 0 && idx[row * nk + i] < nk, "kv_indices must be in [0, ", nk, "), got ",
                  idx[row * nk + i]);
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat:
      forward_kernel<float>(q, k, v, kv_indices, kv_counts, block_q, block_k, scale, out, lse);
      break;
    case at::kBFloat16:
      forward_kernel<c10::BFloat16>(q, k, v, kv_indices, kv_counts, block_q, block_k, scale, out, lse);
      break;
    default:
      TORCH_CHECK(false, "float32 or bfloat16 inputs, got ", q.scalar_type());
  }
  return std::make_tuple(out, lse);
}

}  // namespace

TORCH_LIBRARY(diffsparse_cpu, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor kv_indices, Tensor kv_counts, int block_q, int block_k, "
      "float scale) -> (Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, TORCH_FN(forward));
}
