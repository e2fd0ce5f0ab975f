// Positions and the K=V row store: interleaved RoPE on the rotated tail (MODEL.md 3.6), the FP8 E4M3 round trip of
// the unrotated dims (3.9) and the f16 store into a session's raw window or compressed-row list.
//
// RoPE: one block per token; the first n_rot/2 threads compute pos * inv_freq and its reduction modulo 2 pi in
// float64 (positions reach 10^6 and inv_freq near 1, where a float32 angle would be off by ~0.06 rad), its cos/sin
// in float32 (float64 sincos cost 4 us on the critical path), and every thread then rotates (head, pair) elements.
// KV: one warp per block of 64 values; the FP8 step is exact binary arithmetic (power-of-two scales, frexp/ldexp,
// rint), so it reproduces numpy's float32 reference bit for bit.
#include "common.cuh"

namespace ds4::cuda {
namespace {

__global__ void rope_kernel(float* x, int64_t tok_stride, const int32_t* pos, int pos_delta, const double* inv_freq,
                            int n_head, int head_dim, int n_rot, bool inverse) {
    extern __shared__ float cs[];  // cos[n_rot / 2], sin[n_rot / 2]
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, half = n_rot / 2;
    if (threadIdx.x < half) {
        // The angle and its reduction to [-pi, pi] in float64 (exact enough at any position), the sine in float32.
        const double ang = (double)(pos[t] + pos_delta) * inv_freq[threadIdx.x];
        const float red = (float)(ang - 6.283185307179586 * rint(ang * 0.15915494309189535));
        float sn, cn;
        sincosf(red, &sn, &cn);
        cs[threadIdx.x] = cn;
        cs[half + threadIdx.x] = inverse ? -sn : sn;
    }
    __syncthreads();
    float* xt = x + t * tok_stride + (head_dim - n_rot);
    for (int i = threadIdx.x; i < n_head * half; i += blockDim.x) {
        const int h = i / half, j = i - h * half;
        float2* p = (float2*)(xt + (int64_t)h * head_dim + 2 * j);
        const float2 v = *p;
        const float c = cs[j], sn = cs[half + j];
        *p = make_float2(v.x * c - v.y * sn, v.x * sn + v.y * c);
    }
}

// E4M3FN round trip of one value at the block's scale: v = clamp(x / scale, +-448), round to the nearest
// E4M3 value (spacing 2^(e-3) in binade e, subnormal spacing 2^-9, ties to even), times scale.
__device__ __forceinline__ float e4m3_roundtrip(float x, float scale, float inv_scale) {
    const float v = fminf(fmaxf(x * inv_scale, -448.0f), 448.0f);
    const float a = fabsf(v);
    int e;
    frexpf(a, &e);               // a = m 2^e, m in [0.5, 1): binade e - 1
    e = max(e - 1, -6);
    const float r = ldexpf(rintf(ldexpf(a, 3 - e)), e - 3);
    return copysignf(r, v) * scale;
}

// The block scale 2^ceil(log2(max(amax, 1e-4) / 448)), computed from the exponent (no log rounding).
__device__ __forceinline__ float fp8_scale(float amax) {
    const float y = fmaxf(amax, 1e-4f) / 448.0f;
    int e;
    const float m = frexpf(y, &e);
    return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

// Row t: 64-value blocks, one warp each (lane: values 2 lane, 2 lane + 1); blocks below n_nope get the round trip.
template <typename Out>
__device__ __forceinline__ void kv_row(Out* dst, const float* x, int dim, int n_nope, bool fp8) {
    const int lane = threadIdx.x & 31;
    for (int b = threadIdx.x >> 5; b < dim / 64; b += blockDim.x >> 5) {
        float2 v = *(const float2*)(x + 64 * b + 2 * lane);
        if (fp8 && 64 * b < n_nope) {
            const float scale = fp8_scale(warp_max(fmaxf(fabsf(v.x), fabsf(v.y))));
            const float inv = 1.0f / scale;  // exact: a power of two
            v.x = e4m3_roundtrip(v.x, scale, inv), v.y = e4m3_roundtrip(v.y, scale, inv);
        }
        if constexpr (sizeof(Out) == 2) *(__half2*)(dst + 64 * b + 2 * lane) = __floats2half2_rn(v.x, v.y);
        else *(float2*)(dst + 64 * b + 2 * lane) = v;
    }
}

__global__ void kv_store_kernel(__half* dst, int64_t dst_stride, const float* x, int64_t x_stride, const int32_t* pos,
                                int pos_add, int pos_div, int ring, int dim, int n_nope, bool fp8) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    int slot = (pos[t] + pos_add) / pos_div % ring;
    if (slot < 0) slot += ring;
    kv_row(dst + t * dst_stride + (int64_t)slot * dim, x + t * x_stride, dim, n_nope, fp8);
}

__global__ void fp8_kv_kernel(float* y, const float* x, int dim, int n_nope) {
    pdl_trigger();
    pdl_wait();
    const int64_t r = blockIdx.x;
    kv_row(y + r * dim, x + r * dim, dim, n_nope, true);
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_rope(cudaStream_t s, float* x, int64_t tok_stride, const int32_t* pos, int pos_delta,
                          const double* inv_freq, int n_tok, int n_head, int head_dim, int n_rot, bool inverse) {
    clear_error();
    if (n_tok < 1 || n_head < 1 || n_rot < 2 || n_rot % 2 || n_rot > head_dim || n_rot > 2048 || head_dim % 2 ||
        tok_stride % 2 || (uintptr_t)x % 8)
        return invalid("rope: needs an even n_rot <= head_dim (and <= 2048), even strides, 8-byte aligned x");
    return launch(rope_kernel, dim3(n_tok), dim3(256), n_rot * sizeof(float), s, x, tok_stride, pos, pos_delta,
                  inv_freq, n_head, head_dim, n_rot, inverse);
}

cudaError_t ds4_cuda_kv_store(cudaStream_t s, __half* dst, int64_t dst_stride, const float* x, int64_t x_stride,
                              const int32_t* pos, int pos_add, int pos_div, int ring, int n_tok, int dim, int n_nope,
                              bool fp8) {
    clear_error();
    if (n_tok < 1 || dim < 64 || dim % 64 || n_nope < 0 || n_nope % 64 || n_nope > dim || pos_div < 1 || ring < 1 ||
        (uintptr_t)dst % 4 || (uintptr_t)x % 8 || x_stride % 2 || dst_stride % 2)
        return invalid("kv_store: dim and n_nope must be multiples of 64 (n_nope <= dim), pos_div and ring >= 1");
    return launch(kv_store_kernel, dim3(n_tok), dim3(256), 0, s, dst, dst_stride, x, x_stride, pos, pos_add, pos_div,
                  ring, dim, n_nope, fp8);
}

cudaError_t ds4_cuda_fp8_kv(cudaStream_t s, float* y, const float* x, int64_t n_rows, int dim, int n_nope) {
    clear_error();
    if (n_rows < 1 || dim < 64 || dim % 64 || n_nope < 0 || n_nope % 64 || n_nope > dim || (uintptr_t)x % 8 ||
        (uintptr_t)y % 8 || n_rows > 0x7fffffff)
        return invalid("fp8_kv: dim and n_nope must be multiples of 64 (n_nope <= dim)");
    return launch(fp8_kv_kernel, dim3((unsigned)n_rows), dim3(256), 0, s, y, x, dim, n_nope);
}
