// x @ (scale * q).T for a few activation rows and an int8 weight with one scale per output row, converting the
// int8 values to float32 in registers: the one-row product the libraries lack (theirs convert in memory or run
// scalar code and stream int8 at about half the rate a bf16 matrix-vector product streams bf16).
//
// Built at first use for the machine it runs on (-march=native; llama_dist/model/native.py), registered as
// torch.ops.llama_dist.int8_rows, and run only where the measured kernel choice finds it fastest.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// How far ahead of the row being multiplied each thread asks for its weight bytes, into L2: the hardware
// prefetcher alone keeps too few lines in flight for one core to stream at the memory's rate.
constexpr int64_t kPrefetchBytes = 32 * 1024;

#if defined(__AVX512F__)
constexpr int64_t kStep = 64;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kStep = 16;
#else
constexpr int64_t kStep = 1;  // plain C++: the remainder loop takes every value
#endif

// The dot products of R activation rows (x_stride apart) with one int8 weight row of `in` values: whole vector
// steps in registers, then any remainder one value at a time.
template <int R>
inline void dot_rows(const int8_t* w, const float* x, int64_t in, int64_t x_stride, float* out) {
  const int64_t vec_in = kStep == 1 ? 0 : in - in % kStep;
#if defined(__AVX512F__)
  __m512 acc[R][4];  // four independent sums per row: enough to keep the FMA units busy with one row
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < vec_in; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T1);
    for (int j = 0; j < 4; ++j) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * j));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * x_stride + k + 16 * j), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < vec_in; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T1);
    for (int j = 0; j < 2; ++j) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8 * j));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      for (int r = 0; r < R; ++r)
        acc[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * x_stride + k + 8 * j), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_add_ps(acc[r][0], acc[r][1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[r] = _mm_cvtss_f32(h);
  }
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;  // no vector steps (kStep 1): the loop below does it all
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t k = vec_in; k < in; ++k) out[r] += x[r * x_stride + k] * static_cast<float>(w[k]);
}

// Activation rows per pass over a weight row: their sums stay in registers and their float32 values in L1 (eight
// 2048-wide rows would not: 64 KiB).
constexpr int kMaxRows = 4;

// y[r, o] = scale[o] * dot(x[r], q[o]) for R activation rows (float32, `in` apart); y of type Out, `out` apart.
template <int R, typename Scale, typename Out>
void rows_pass(const int8_t* q, const float* x, const Scale* scale, Out* y, int64_t out, int64_t in) {
  // Each thread takes one contiguous run of weight rows: one stream through memory per core.
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    float dots[R];
    for (int64_t o = begin; o < end; ++o) {
      dot_rows<R>(q + o * in, x, in, in, dots);
      const float s = static_cast<float>(scale[o]);
      for (int r = 0; r < R; ++r) y[r * out + o] = static_cast<Out>(dots[r] * s);
    }
  });
}

template <typename Scale, typename Out>
void all_rows(const int8_t* q, const float* x, const Scale* scale, Out* y, int64_t rows, int64_t out, int64_t in) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const float* xs = x + r0 * in;
    Out* ys = y + r0 * out;
    switch (std::min<int64_t>(kMaxRows, rows - r0)) {
      case 1: rows_pass<1>(q, xs, scale, ys, out, in); break;
      case 2: rows_pass<2>(q, xs, scale, ys, out, in); break;
      case 3: rows_pass<3>(q, xs, scale, ys, out, in); break;
      default: rows_pass<4>(q, xs, scale, ys, out, in); break;
    }
  }
}

// The output in x's dtype and the scales in theirs (float32, bfloat16 or float16): converted value by value here
// rather than by whole-tensor copies around the call (a decode step makes ~4 calls per layer).
template <typename Out>
void dispatch_scale(const at::Tensor& q, const float* x, const at::Tensor& scale, at::Tensor& y) {
  const int64_t rows = y.size(0), out = q.size(0), in = q.size(1);
  const int8_t* qs = q.const_data_ptr<int8_t>();
  Out* ys = y.mutable_data_ptr<Out>();
  switch (scale.scalar_type()) {
    case at::kFloat: all_rows(qs, x, scale.const_data_ptr<float>(), ys, rows, out, in); break;
    case at::kBFloat16: all_rows(qs, x, scale.const_data_ptr<c10::BFloat16>(), ys, rows, out, in); break;
    case at::kHalf: all_rows(qs, x, scale.const_data_ptr<c10::Half>(), ys, rows, out, in); break;
    default: TORCH_CHECK(false, "int8_rows: scales must be float32, bfloat16 or float16");
  }
}

template <typename In>
std::vector<float> as_float(const at::Tensor& x) {
  const In* p = x.const_data_ptr<In>();
  std::vector<float> out(x.numel());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[i]);
  return out;
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && x.size(1) == qweight.size(1), "int8_rows: x (rows, in), qweight (out, in)");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && x.device().is_cpu() && qweight.device().is_cpu(),
              "int8_rows: CPU int8 weight");
  TORCH_CHECK(scale.numel() == qweight.size(0), "int8_rows: one scale per output row");
  const at::Tensor xc = x.contiguous(), q = qweight.contiguous(), s = scale.contiguous();
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  // The activations in float32 (a few rows, read once per weight row from L1).
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_scale<float>(q, xc.const_data_ptr<float>(), s, y); break;
    case at::kBFloat16: dispatch_scale<c10::BFloat16>(q, as_float<c10::BFloat16>(xc).data(), s, y); break;
    case at::kHalf: dispatch_scale<c10::Half>(q, as_float<c10::Half>(xc).data(), s, y); break;
    default: TORCH_CHECK(false, "int8_rows: activations must be float32, bfloat16 or float16");
  }
  return y;
}

// Shapes only: what torch.compile traces the call with (a compiled decode step keeps it as one opaque call).
at::Tensor int8_rows_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && x.size(1) == qweight.size(1), "int8_rows: x (rows, in), qweight (out, in)");
  return at::empty({x.size(0), qweight.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY(llama_dist, m) { m.def("int8_rows(Tensor x, Tensor qweight, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(llama_dist, CPU, m) { m.impl("int8_rows", &int8_rows); }
TORCH_LIBRARY_IMPL(llama_dist, Meta, m) { m.impl("int8_rows", &int8_rows_meta); }
