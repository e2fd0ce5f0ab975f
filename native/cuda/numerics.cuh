// The faithful numerics' device arithmetic (MODEL.md 3.6, 3.9), shared by the K=V store (rope_kv.cu), the
// compressors' row finish and the indexer's query (compress.cu), the norms (norm_hc.cu) and the attention's decode
// front (attention.cu): the RoPE angle and rotation, the rows' norm + RoPE, the FP8 E4M3 and FP4 E2M1 round trips
// with their power-of-two block scales, and the 128-point Walsh-Hadamard transform of the indexer. Every step of
// the round trips is exact binary arithmetic (frexp/ldexp, rint), so they reproduce numpy's float32 reference bit
// for bit.
#pragma once
#include "common.cuh"

namespace ds4::cuda {

// cos and sin of pos * inv_freq: the angle and its reduction to [-pi, pi] in float64 (positions reach 10^6 and
// inv_freq near 1, where a float32 angle would be off by ~0.06 rad), the sine in float32 (float64 sincos cost 4 us
// on the decode critical path).
__device__ __forceinline__ void rope_angle(int pos, double inv_freq, float& c, float& s) {
    const double ang = (double)pos * inv_freq;
    const float red = (float)(ang - 6.283185307179586 * rint(ang * 0.15915494309189535));
    sincosf(red, &s, &c);
}

// Two interleaved pairs (x, y) and (z, w) rotated by the angles whose cosines and sines are c0, s0 and c1, s1.
__device__ __forceinline__ float4 rope4(float4 o, float c0, float s0, float c1, float s1) {
    return make_float4(o.x * c0 - o.y * s0, o.x * s0 + o.y * c0, o.z * c1 - o.w * s1, o.z * s1 + o.w * c1);
}

// RMSNorm and RoPE of a row, one float4 of it at a time (the query heads' and the K=V row's, MODEL.md 3.4): the
// float4 v at element i of an n-value row times inv, the reciprocal of its norm divisor (1 / sqrtf(sum of squares
// / n + eps): one division per row, not one per value), times the weight's float4 g where there is one, then with
// n_rot > 0 the rotation of the row's last n_rot values (two interleaved pairs; i - (n - n_rot) is a multiple of
// 4) by cs (cos[n_rot / 2], then sin[n_rot / 2]). Both the norm kernel and the attention kernel's decode front use
// it, so that the two give the same bits.
__device__ __forceinline__ float4 norm_rope4(float4 v, float inv, const float4* g, int64_t i, int64_t n, int n_rot,
                                            const float* cs) {
    float4 o = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
    if (g) o.x *= g->x, o.y *= g->y, o.z *= g->z, o.w *= g->w;
    if (n_rot && i >= n - n_rot) {
        const int half = n_rot / 2, j = (int)(i - (n - n_rot)) / 2;
        o = rope4(o, cs[j], cs[half + j], cs[j + 1], cs[half + j + 1]);
    }
    return o;
}

// 2^ceil(log2(y)) for y > 0, from the binary exponent (no log rounding).
__device__ __forceinline__ float pow2_ceil(float y) {
    int e;
    const float m = frexpf(y, &e);
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

// Round |v| <= the format's maximum to the nearest value of a binary minifloat with mant_bits mantissa bits and
// smallest normal exponent min_exp (spacing 2^(e - mant_bits) in binade e, subnormals below), ties to even.
template <int MantBits, int MinExp>
__device__ __forceinline__ float round_minifloat(float v) {
    const float a = fabsf(v);
    int e;
    frexpf(a, &e);               // a = m 2^e, m in [0.5, 1): binade e - 1
    e = max(e - 1, MinExp);
    return copysignf(ldexpf(rintf(ldexpf(a, MantBits - e)), e - MantBits), v);
}

// E4M3FN round trip of one value at its block's scale: clamp(x / scale, +-448), nearest E4M3, times scale.
__device__ __forceinline__ float e4m3_roundtrip(float x, float scale, float inv_scale) {
    return round_minifloat<3, -6>(fminf(fmaxf(x * inv_scale, -448.0f), 448.0f)) * scale;
}
// The FP8 block scale: 2^ceil(log2(max(amax, 1e-4) / 448)).
__device__ __forceinline__ float fp8_scale(float amax) { return pow2_ceil(fmaxf(amax, 1e-4f) / 448.0f); }

// E2M1 round trip: clamp(x / scale, +-6), nearest of {0, 0.5, 1, 1.5, 2, 3, 4, 6} (ties to even), times scale.
__device__ __forceinline__ float e2m1_roundtrip(float x, float scale, float inv_scale) {
    return round_minifloat<1, 0>(fminf(fmaxf(x * inv_scale, -6.0f), 6.0f)) * scale;
}
// The FP4 block scale: 2^ceil(log2(max(amax, 7.05e-38) / 6)).
__device__ __forceinline__ float fp4_scale(float amax) {
    return pow2_ceil(fmaxf(amax, 7.052966104933725e-38f) / 6.0f);
}

// The indexer's FP4 path on one 128-vector held by a warp, lane i owning elements 4i .. 4i+3 (MODEL.md 3.9): the
// natural-order Walsh-Hadamard butterfly (unnormalized), times 1/sqrt(128), then the E2M1 round trip per block of
// 32 elements (8 lanes).
__device__ __forceinline__ void hadamard128_fp4(float (&v)[4]) {
    const int lane = threadIdx.x & 31;
    // Strides 1 and 2 inside the lane, then 4 .. 64 across lanes (element bit h is lane bit h / 4): an element
    // whose bit is clear becomes x + partner, one whose bit is set partner - x.
    float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    v[0] = a0 + a2, v[1] = a1 + a3, v[2] = a0 - a2, v[3] = a1 - a3;
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
        const bool upper = lane & m;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float other = __shfl_xor_sync(0xffffffffu, v[k], m);
            v[k] = upper ? other - v[k] : v[k] + other;
        }
    }
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[k] *= 0.08838834764831845f;
        amax = fmaxf(amax, fabsf(v[k]));
    }
    amax = group8_max(amax);
    const float scale = fp4_scale(amax), inv = 1.0f / scale;  // exact: a power of two
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = e2m1_roundtrip(v[k], scale, inv);
}

}  // namespace ds4::cuda
