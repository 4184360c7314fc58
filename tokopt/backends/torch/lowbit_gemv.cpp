// Low-bit weight x float activation products for the compiled torch session, on the IR's own layout.
//
// y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g],  g = k / group_size
//         = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k]  -  z[n, g] * sum_{k in g} x[m, k])
//
// The codes are read exactly as the IR stores them (QuantizedWeight.packed: 8-bit codes one per
// byte, 4-bit codes two per byte with element 2j in the low nibble), the scales in their stored
// float type (float32, float16 or bfloat16: a g32 weight's scales are an eighth of its bytes in
// float16, a quarter in float32), the zero points as uint8 or, symmetric, the implied 2^(bits-1).
// Nothing is repacked, so the session holds one copy of the codes.
//
// Why a kernel of our own: torch's low-bit CPU kernels take symmetric int4 groups and per-channel
// int8 with bfloat16 inputs and scales only; every other format (zero points, float16 scales, float
// or int8 inputs, grouped int8) would otherwise be dequantized to float32 — 4 to 8 times the bytes in
// memory and per token.  Where torch's kernels apply they are faster here (they read 1.4-2.2x the
// bytes per second at one token: benchmarks/bench_native_lowbit.py) and the session prefers them.
// Each vector of codes is unpacked and scaled once and multiplied into up to two inputs; several
// output rows' accumulators are in flight at once (the FMA latency, not bandwidth, bounds one
// row's chain).  Float32 accumulation: the definition's product up to the order of the sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 32;  // int4: x is de-interleaved per chunk of 32 elements (16 bytes of codes)

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
#error "tokopt's low-bit kernel needs AVX2 and FMA or AVX-512"
#endif

template <typename S>
inline float scale_at(const S* s, int64_t i) { return static_cast<float>(s[i]); }

// x's chunks of 32 rearranged as [16 even elements, 16 odd elements]: a byte's low nibble holds
// an even element and its high nibble the next odd one, so both halves line up with one load.
std::vector<float> deinterleave(const float* x, int64_t m, int64_t k) {
  std::vector<float> out(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; c += kChunk)
      for (int64_t i = 0; i < kChunk / 2; ++i) {
        out[r * k + c + i] = x[r * k + c + 2 * i];
        out[r * k + c + kChunk / 2 + i] = x[r * k + c + 2 * i + 1];
      }
  return out;
}

#if defined(__AVX512F__)
using vec = __m512;
constexpr int kLanes = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#else
using vec = __m256;
constexpr int kLanes = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)
using ivec = __m512i;
inline ivec iset(int v) { return _mm512_set1_epi32(v); }
inline vec dequant(ivec q, ivec z, vec s) { return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, z)), s); }
inline ivec load_u8(const uint8_t* p) {  // kLanes bytes -> kLanes int32 lanes
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline ivec low_nibbles(ivec v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
inline ivec high_nibbles(ivec v) { return _mm512_srli_epi32(v, 4); }
#else
using ivec = __m256i;
inline ivec iset(int v) { return _mm256_set1_epi32(v); }
inline vec dequant(ivec q, ivec z, vec s) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, z)), s); }
inline ivec load_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline ivec low_nibbles(ivec v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
inline ivec high_nibbles(ivec v) { return _mm256_srli_epi32(v, 4); }
#endif

// R output rows times MB input rows, over all of K: every vector of codes is unpacked and scaled once
// and multiplied into MB inputs; R*MB independent accumulators hide the FMA latency.  Row and input
// indices past the end are clamped (computed twice, written once), so R and MB stay compile-time.
template <int BITS, int R, int MB, typename S>
void tile(const float* xd, int64_t m, int64_t k, const uint8_t* packed, const S* scales, const uint8_t* zeros,
          int64_t group, int64_t n, int64_t r0, int64_t m0, float* y) {
  const int64_t groups = k / group, row_bytes = k * BITS / 8;
  const uint8_t* q[R];
  int64_t row[R];
  for (int r = 0; r < R; ++r) {
    row[r] = std::min(r0 + r, n - 1);
    q[r] = packed + row[r] * row_bytes;
  }
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = xd + std::min(m0 + i, m - 1) * k;
  vec total[R][MB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) total[r][i] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    vec s[R];
    ivec z[R];
    for (int r = 0; r < R; ++r) {
      const int64_t at = row[r] * groups + g;
      s[r] = vset(scale_at(scales, at));
      z[r] = iset(zeros ? zeros[at] : 1 << (BITS - 1));
    }
    const int64_t k0 = g * group;
    if constexpr (BITS == 4) {
      // a chunk of 32 elements is 16 bytes: kLanes of them give kLanes even and kLanes odd elements
      for (int64_t c = k0; c < k0 + group; c += kChunk) {
        for (int h = 0; h < kChunk / 2; h += kLanes) {
          vec xe[MB], xo[MB];
          for (int i = 0; i < MB; ++i) { xe[i] = vload(x[i] + c + h); xo[i] = vload(x[i] + c + kChunk / 2 + h); }
          for (int r = 0; r < R; ++r) {
            const ivec v = load_u8(q[r] + c / 2 + h);  // byte b holds elements 2b and 2b+1
            const vec lo = dequant(low_nibbles(v), z[r], s[r]);
            const vec hi = dequant(high_nibbles(v), z[r], s[r]);
            for (int i = 0; i < MB; ++i) total[r][i] = vfma(hi, xo[i], vfma(lo, xe[i], total[r][i]));
          }
        }
      }
    } else {
      for (int64_t c = k0; c < k0 + group; c += kLanes) {
        vec xv[MB];
        for (int i = 0; i < MB; ++i) xv[i] = vload(x[i] + c);
        for (int r = 0; r < R; ++r) {
          const vec w = dequant(load_u8(q[r] + c), z[r], s[r]);
          for (int i = 0; i < MB; ++i) total[r][i] = vfma(w, xv[i], total[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R && r0 + r < n; ++r)
    for (int i = 0; i < MB && m0 + i < m; ++i) y[(m0 + i) * n + r0 + r] = vsum(total[r][i]);
}

// One input row: four output rows at a time; several: two by two (AVX2 has 16 vector registers).
template <int BITS, typename S>
void gemv_rows(const float* xd, int64_t m, int64_t k, const uint8_t* packed, const S* scales,
               const uint8_t* zeros, int64_t group, float* y, int64_t n, int64_t row0, int64_t row1) {
  if (m == 1) {
    for (int64_t r0 = row0; r0 < row1; r0 += 4) tile<BITS, 4, 1>(xd, m, k, packed, scales, zeros, group, n, r0, 0, y);
    return;
  }
  for (int64_t r0 = row0; r0 < row1; r0 += 2)
    for (int64_t m0 = 0; m0 < m; m0 += 2) tile<BITS, 2, 2>(xd, m, k, packed, scales, zeros, group, n, r0, m0, y);
}

template <int BITS, typename S>
void dequant_rows(const uint8_t* packed, const S* scales, const uint8_t* zeros, int64_t group, int64_t k, float* w,
                  int64_t row0, int64_t row1) {
  const int64_t groups = k / group, row_bytes = k * BITS / 8;
  for (int64_t r = row0; r < row1; ++r) {
    const uint8_t* q = packed + r * row_bytes;
    float* out = w + r * k;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale_at(scales, r * groups + g);
      const float z = zeros ? static_cast<float>(zeros[r * groups + g]) : static_cast<float>(1 << (BITS - 1));
      if constexpr (BITS == 4) {
        for (int64_t b = g * group / 2; b < (g + 1) * group / 2; ++b) {
          out[2 * b] = (static_cast<float>(q[b] & 15) - z) * s;
          out[2 * b + 1] = (static_cast<float>(q[b] >> 4) - z) * s;
        }
      } else {
        for (int64_t j = g * group; j < (g + 1) * group; ++j) out[j] = (static_cast<float>(q[j]) - z) * s;
      }
    }
  }
}

void check_format(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                  int64_t bits, int64_t group, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "low-bit kernel: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group > 0 && k % group == 0 && group % (bits == 4 ? kChunk : kLanes) == 0,
              "low-bit kernel: group size ", group, " does not tile ", k, " input features");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == k * bits / 8, "low-bit kernel: packed codes must be contiguous uint8 (N, K*bits/8)");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == packed.size(0) * (k / group),
              "low-bit kernel: scales must be contiguous (N, K/group)");
  if (zeros) TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() &&
                             zeros->numel() == scales.numel(), "low-bit kernel: zero points must be uint8 like scales");
}

template <typename Fn>
void dispatch_scales(const at::Tensor& scales, Fn&& fn) {
  switch (scales.scalar_type()) {
    case at::kFloat: fn(scales.data_ptr<float>()); break;
    case at::kHalf: fn(scales.data_ptr<at::Half>()); break;
    case at::kBFloat16: fn(scales.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "low-bit kernel: scales must be float32, float16 or bfloat16");
  }
}

}  // namespace

template <typename Fn>
void dispatch(const at::Tensor& scales, int64_t bits, Fn&& fn) {
  dispatch_scales(scales, [&](auto* sp) {
    if (bits == 4) fn(std::integral_constant<int, 4>{}, sp);
    else fn(std::integral_constant<int, 8>{}, sp);
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "low-bit kernel: x must be float32 (M, K)");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0);
  check_format(packed, scales, zeros, bits, group, k);
  const float* xp = xc.data_ptr<float>();
  // 4-bit codes read x de-interleaved (a copy per call); 8-bit ones read it in place
  const std::vector<float> xd4 = bits == 4 ? deinterleave(xp, m, k) : std::vector<float>();
  const float* xd = bits == 4 ? xd4.data() : xp;
  at::Tensor y = at::empty({m, n}, xc.options());
  const uint8_t* zp = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = packed.data_ptr<uint8_t>();
  // a task reads at least 64 KiB of codes: a thread is not woken for less (the 192 x 576 int4 k/v)
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(1, packed.size(1) * m));
  dispatch(scales, bits, [&](auto b, auto* sp) {
    at::parallel_for(0, (n + 3) / 4, (grain + 3) / 4, [&](int64_t t0, int64_t t1) {
      gemv_rows<decltype(b)::value>(xd, m, k, qp, sp, zp, group, yp, n, t0 * 4, std::min(n, t1 * 4));
    });
  });
  return y;
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      int64_t bits, int64_t group, int64_t k) {
  check_format(packed, scales, zeros, bits, group, k);
  const int64_t n = packed.size(0);
  at::Tensor w = at::empty({n, k}, packed.options().dtype(at::kFloat));
  const uint8_t* zp = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  dispatch(scales, bits, [&](auto b, auto* sp) {
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      dequant_rows<decltype(b)::value>(packed.data_ptr<uint8_t>(), sp, zp, group, k, w.data_ptr<float>(), r0, r1);
    });
  });
  return w;
}

std::string isa() { return kIsa; }

TORCH_LIBRARY(tokopt_lowbit, m) {
  m.def("gemv(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, int group) -> Tensor");
  m.def("dequantize(Tensor packed, Tensor scales, Tensor? zeros, int bits, int group, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokopt_lowbit, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("dequantize", &dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.def("isa", &isa); }
