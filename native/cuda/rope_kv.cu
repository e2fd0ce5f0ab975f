// Positions and the K=V row store: interleaved RoPE on the rotated tail (MODEL.md 3.6), the FP8 E4M3 round trip of
// the unrotated dims (3.9) and the f16 store into a session's raw window or compressed-row list.
//
// RoPE: one block per token; the first n_rot/2 threads compute the angles (numerics.cuh: float64 angle, float32
// sine), and every thread then rotates (head, pair) elements. KV: one warp per block of 64 values; the FP8 step
// (numerics.cuh) reproduces numpy's float32 reference bit for bit. The store goes to a row of one array per token
// (dst + t * dst_stride) or, with a row table, to the array that token's own table entry names (sessions of a
// batch live in separate buffers).
#include "common.cuh"
#include "numerics.cuh"

namespace ds4::cuda {
namespace {

__global__ void rope_kernel(float* x, int64_t tok_stride, const int32_t* pos, int pos_delta, const double* inv_freq,
                            int n_head, int head_dim, int n_rot, bool inverse) {
    extern __shared__ float cs[];  // cos[n_rot / 2], sin[n_rot / 2]
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, half = n_rot / 2;
    if (threadIdx.x < half) {
        float sn, cn;
        rope_angle(pos[t] + pos_delta, inv_freq[threadIdx.x], cn, sn);
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

template <typename Out>
__global__ void kv_store_kernel(Out* dst, int64_t dst_stride, Out* const* dst_rows, const float* x, int64_t x_stride,
                                const int32_t* pos, int pos_add, int pos_div, int ring, int dim, int n_nope, bool fp8) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    int slot = (pos[t] + pos_add) / pos_div % ring;
    if (slot < 0) slot += ring;
    Out* base = dst_rows ? dst_rows[t] : dst + t * dst_stride;
    kv_row(base + (int64_t)slot * dim, x + t * x_stride, dim, n_nope, fp8);
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

cudaError_t ds4_cuda_kv_store(cudaStream_t s, void* dst, int64_t dst_stride, const float* x, int64_t x_stride,
                              const int32_t* pos, int pos_add, int pos_div, int ring, int n_tok, int dim, int n_nope,
                              bool fp8, void* const* dst_rows, bool f32_rows) {
    clear_error();
    if (n_tok < 1 || dim < 64 || dim % 64 || n_nope < 0 || n_nope % 64 || n_nope > dim || pos_div < 1 || ring < 1 ||
        (uintptr_t)dst % 4 || (uintptr_t)x % 8 || x_stride % 2 || dst_stride % 2)
        return invalid("kv_store: dim and n_nope must be multiples of 64 (n_nope <= dim), pos_div and ring >= 1");
    if (f32_rows)
        return launch(kv_store_kernel<float>, dim3(n_tok), dim3(256), 0, s, (float*)dst, dst_stride,
                      (float* const*)dst_rows, x, x_stride, pos, pos_add, pos_div, ring, dim, n_nope, fp8);
    return launch(kv_store_kernel<__half>, dim3(n_tok), dim3(256), 0, s, (__half*)dst, dst_stride,
                  (__half* const*)dst_rows, x, x_stride, pos, pos_add, pos_div, ring, dim, n_nope, fp8);
}

cudaError_t ds4_cuda_fp8_kv(cudaStream_t s, float* y, const float* x, int64_t n_rows, int dim, int n_nope) {
    clear_error();
    if (n_rows < 1 || dim < 64 || dim % 64 || n_nope < 0 || n_nope % 64 || n_nope > dim || (uintptr_t)x % 8 ||
        (uintptr_t)y % 8 || n_rows > 0x7fffffff)
        return invalid("fp8_kv: dim and n_nope must be multiples of 64 (n_nope <= dim)");
    return launch(fp8_kv_kernel, dim3((unsigned)n_rows), dim3(256), 0, s, y, x, dim, n_nope);
}
