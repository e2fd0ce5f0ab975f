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

#endif

// The fixed horizontal sum: fold the upper half onto the lower one until one lane is left.
inline float vf_hsum(vf v) {
    alignas(64) float l[kLanes];
    vf_store(l, v);
    for (int half = kLanes / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) l[i] = l[i] + l[i + half];
    return l[0];
}

}  // namespace ds4::cpu
