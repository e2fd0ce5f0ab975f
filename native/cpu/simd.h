// Vocabulary shared by the ISA translation units (native/cpu/isa/*.cpp); included only there.
//
// `vf` is the float vector of the level being compiled: 16 lanes (AVX-512), 8 lanes (AVX2), or 8 lanes of plain
// scalar code (portable). Kernels written against it (the f32-activation matrix product) exist once and get the
// level's width and its multiply-add: fused (one rounding) where the level has FMA, a product then a sum
// (two roundings) in portable code. The horizontal sum is a fixed tree, so a dot's reduction order depends only
// on the level and the length.
#pragma once
#include <cstdint>
#include <cstring>

#if !defined(DS4_ISA_portable)
#include <immintrin.h>
#endif

namespace ds4::cpu {

template <class T>
inline T load_unaligned(const void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

inline float bits_to_f32(uint32_t b) { return load_unaligned<float>(&b); }

inline uint32_t f32_to_bits(float f) { return load_unaligned<uint32_t>(&f); }

// IEEE half -> float without branches (so that loops of it vectorize), exact for every input (NaN payloads
// included). Normal halves: exponent and mantissa shifted into place, the exponent rebased by 127 - 15 = 112
// (twice for inf/NaN, to reach 255). Subnormal halves: the mantissa m under a float exponent of 2^-1 reads
// 0.5 + m * 2^-24, and subtracting 0.5 leaves m * 2^-24 exactly.
inline float fp16_to_fp32_scalar(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, body = (uint32_t)(h & 0x7fff);
    const uint32_t normal = (body << 13) + (112u << 23) + (body >= 0x7c00 ? 112u << 23 : 0);
    const uint32_t subnormal = f32_to_bits(bits_to_f32((126u << 23) | body) - 0.5f);
    return bits_to_f32(sign | (body < 0x400 ? subnormal : normal));
}

inline float fp16_to_fp32(uint16_t h) {
#if defined(DS4_ISA_portable)
    return fp16_to_fp32_scalar(h);
#else
    return _cvtsh_ss(h);
#endif
}

inline float bf16_to_fp32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

// Decode streams each weight row once from memory. The hardware prefetchers stop at 4 KB page boundaries, so
// the kernels also ask for the lines kPrefetchAhead bytes past what they are reading, into L2 only (prefetcht2:
// a prefetch into L1 competes with the demand loads and measured slower). On this Zen 4 machine with 4 KB pages
// that is worth 10-30% of decode bandwidth.
constexpr int kPrefetchAhead = 8192;

inline void prefetch_ahead(const void* p, int bytes) {
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char*)p + o + kPrefetchAhead, 0, 1);
}

// ---- float vectors ---------------------------------------------------------------------------------------------

#if defined(DS4_ISA_avx512)

constexpr int kLanes = 16;
using vf = __m512;
inline vf vf_zero() { return _mm512_setzero_ps(); }
inline vf vf_load(const float* p) { return _mm512_loadu_ps(p); }
inline void vf_store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vf_load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vf vf_load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vf vf_from_i8(const void* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
inline vf vf_set1(float v) { return _mm512_set1_ps(v); }
inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vf_madd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }  // a > b ? a : b (b when either is NaN)
inline vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }  // a < b ? a : b
// 2^n from the bits of a float t = n + 1.5 * 2^23 (|n| < 2^22): (n + 127) << 23, in integer lanes.
inline vf vf_pow2_magic(vf t) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000)), 23));
}

#elif defined(DS4_ISA_avx2)

constexpr int kLanes = 8;
using vf = __m256;
inline vf vf_zero() { return _mm256_setzero_ps(); }
inline vf vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline void vf_store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vf_load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vf vf_load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vf vf_from_i8(const void* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
inline vf vf_set1(float v) { return _mm256_set1_ps(v); }
inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vf_madd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }  // a > b ? a : b (b when either is NaN)
inline vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }  // a < b ? a : b
inline vf vf_pow2_magic(vf t) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23));
}

#else  // portable: eight lanes of scalar code (compilers map them onto whatever SIMD the baseline has)

constexpr int kLanes = 8;
struct vf {
    float v[8];
};
inline vf vf_zero() { return vf{}; }
inline vf vf_load(const float* p) {
    vf r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
}
inline void vf_store(float* p, vf v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline vf vf_load_f16(const uint16_t* p) {
    vf r;
    for (int i = 0; i < 8; ++i) r.v[i] = fp16_to_fp32_scalar(p[i]);
    return r;
}
inline vf vf_load_bf16(const uint16_t* p) {
    vf r;
    for (int i = 0; i < 8; ++i) r.v[i] = bf16_to_fp32(p[i]);
    return r;
}
inline vf vf_from_i8(const void* p) {
    vf r;
    for (int i = 0; i < 8; ++i) r.v[i] = (float)((const int8_t*)p)[i];
    return r;
}
inline vf vf_set1(float v) {
    vf r;
    for (int i = 0; i < 8; ++i) r.v[i] = v;
    return r;
}
inline vf vf_mul(vf a, vf b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] * b.v[i];
    return a;
}
inline vf vf_madd(vf a, vf b, vf c) {
    for (int i = 0; i < 8; ++i) c.v[i] = c.v[i] + a.v[i] * b.v[i];
    return c;
}
inline vf vf_add(vf a, vf b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] + b.v[i];
    return a;
}
inline vf vf_sub(vf a, vf b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] - b.v[i];
    return a;
}
inline vf vf_div(vf a, vf b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] / b.v[i];
    return a;
}
inline vf vf_max(vf a, vf b) {  // the SIMD instructions' semantics: b when either is NaN
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
}
inline vf vf_min(vf a, vf b) {
    for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return a;
}
inline vf vf_pow2_magic(vf t) {
    for (int i = 0; i < 8; ++i) t.v[i] = bits_to_f32((f32_to_bits(t.v[i]) + (uint32_t)(127 - 0x4B400000)) << 23);
    return t;
}

#endif

// exp(x) in float32 with a fixed sequence of rounded operations (no fused multiply-add, no table), so that every
// level and a numpy model (tests/test_cpu_ops.py) give the same bits; about 2 units in the last place. It is the
// Cephes expf: x clamped to [-87, 88] (so 2^n stays a normal number; NaN passes through), n = rint(x log2 e) by
// the 1.5 * 2^23 trick, r = (x - n C1) - n C2 with C1 + C2 = ln 2 (C1 exact in 10 bits), then
// e^r = ((p(r) r^2) + r) + 1 by Horner, times 2^n built from n's bits. Used for the SwiGLU of the experts and
// the softmax of attention, where e^-87 standing in for smaller values is far below f32 resolution of the sums.
inline vf vf_exp(vf x) {
    x = vf_min(vf_set1(88.0f), vf_max(vf_set1(-87.0f), x));
    const vf t = vf_add(vf_mul(x, vf_set1(1.44269504088896341f)), vf_set1(12582912.0f));
    const vf n = vf_sub(t, vf_set1(12582912.0f));
    vf r = vf_sub(x, vf_mul(n, vf_set1(0.693359375f)));
    r = vf_sub(r, vf_mul(n, vf_set1(-2.12194440e-4f)));
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_add(vf_mul(p, r), vf_set1(1.3981999507e-3f));
    p = vf_add(vf_mul(p, r), vf_set1(8.3334519073e-3f));
    p = vf_add(vf_mul(p, r), vf_set1(4.1665795894e-2f));
    p = vf_add(vf_mul(p, r), vf_set1(1.6666665459e-1f));
    p = vf_add(vf_mul(p, r), vf_set1(5.0000001201e-1f));
    p = vf_add(vf_add(vf_mul(p, vf_mul(r, r)), r), vf_set1(1.0f));
    return vf_mul(p, vf_pow2_magic(t));
}

// The fixed horizontal sum: fold the upper half onto the lower one until one lane is left (lane i + half added
// to lane i). The SIMD levels spell the same folds with shuffles, so that it stays a handful of instructions.
inline float vf_hsum(vf v) {
#if defined(DS4_ISA_avx512) || defined(DS4_ISA_avx2)
#if defined(DS4_ISA_avx512)
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
    const __m256 a = v;
#endif
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
#else
    alignas(64) float l[kLanes];
    vf_store(l, v);
    for (int half = kLanes / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) l[i] = l[i] + l[i + half];
    return l[0];
#endif
}

}  // namespace ds4::cpu
