// RMSNorm and the hyper-connection steps around each sublayer (MODEL.md 3.2, 3.3, 3.5).
//
// rms_norm: one block per row. hc_pre: the 24-row mixer product runs on the unnormalized streams, split over its
// 16384 columns (hc_mix_kernel), and a second kernel per token adds the partial sums and takes the norm of the
// streams (RMSNorm without weight is one scalar per token, so fn . (X / r) = (fn . X) / r), the sigmoid gates, the
// 20-iteration Sinkhorn normalization (lanes 0-15 hold the 4x4 matrix; row sums are shuffles within groups of 4
// lanes, column sums across them) and the weighted sum of the streams. hc_post: one thread per position e
// computes all 4 new streams from the 4 old ones, so it may work in place.
#include "common.cuh"
#include "numerics.cuh"

namespace ds4::cuda {
namespace {

constexpr int kHc = 4;  // streams (n_hc); MODEL.md: 4 in every DS4 file

// One block per row; each thread holds up to kVec float4 of the row (and of the weight) in registers, all loaded
// before the reduction, so a row costs one memory latency and in-place use is safe.
constexpr int kVec = 4;

__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}

// With pos, RoPE follows on the row's last n_rot values (row r is token r / rows_per_tok), as rope_kernel computes
// it: the fused norm + RoPE of the query heads and the K=V row.
__global__ void rms_norm_kernel(float* y, int64_t y_stride, const float* x, int64_t x_stride,
                                const float* __restrict__ w, int64_t n, float eps, const int32_t* pos,
                                int rows_per_tok, const double* inv_freq, int n_rot) {
    __shared__ float red[32];
    extern __shared__ float cs[];  // with pos: cos[n_rot / 2], sin[n_rot / 2]
    pdl_trigger();
    pdl_wait();
    const int half = n_rot / 2;
    if (pos)
        for (int j = threadIdx.x; j < half; j += blockDim.x)
            rope_angle(pos[blockIdx.x / rows_per_tok], inv_freq[j], cs[j], cs[half + j]);
    const float* xr = x + blockIdx.x * x_stride;
    float4 v[kVec], g[kVec];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
        const int64_t i = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (i < n) {
            v[k] = *(const float4*)(xr + i);
            if (w) g[k] = *(const float4*)(w + i);
        }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
        const int64_t i = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (i < n) {
            ss = fmaf(v[k].x, v[k].x, ss), ss = fmaf(v[k].y, v[k].y, ss);
            ss = fmaf(v[k].z, v[k].z, ss), ss = fmaf(v[k].w, v[k].w, ss);
        }
    }
    const float den = sqrtf(block_sum(ss, red) / (float)n + eps);
    float* yr = y + blockIdx.x * y_stride;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
        const int64_t i = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (i < n) {
            float4 o = make_float4(v[k].x / den, v[k].y / den, v[k].z / den, v[k].w / den);
            if (w) o.x *= g[k].x, o.y *= g[k].y, o.z *= g[k].z, o.w *= g[k].w;
            if (pos && i >= n - n_rot) {  // two interleaved pairs (n - n_rot is a multiple of 4)
                const int j = (int)(i - (n - n_rot)) / 2;
                const float c0 = cs[j], s0 = cs[half + j], c1 = cs[j + 1], s1 = cs[half + j + 1];
                o = make_float4(o.x * c0 - o.y * s0, o.x * s0 + o.y * c0, o.z * c1 - o.w * s1, o.z * s1 + o.w * c1);
            }
            *(float4*)(yr + i) = o;
        }
    }
}

// The HC mixer product, split over the columns: block (b, y) takes columns [512 b, 512 b + 512) of the 4 * n_embd,
// all n_mix rows and tokens 16 y .. 16 y + 15, and leaves partial sums (n_tok, n_blocks, n_mix) that hc_finish adds
// in block order. (24 rows of 16384 give a row-walking product too few rows to spread over the GPU: 12-24
// blocks.) The block's activation columns sit in shared memory; each warp takes rows warp, warp + 8, ..., lane i
// columns 4 i + 128 j .. + 3 for j < 4 (consecutive lanes read consecutive 16-byte pieces: no bank conflicts; 16
// consecutive columns per lane were a 4-way conflict on every load, which made the prefill's hc_pre slow).
constexpr int kMixCols = 512, kMixTok = 16;

__global__ void hc_mix_kernel(float* part, const float* X, int64_t x_stride, const void* fn, int fn_type, int n_mix,
                              int64_t cols, int n_tok) {
    __shared__ __align__(16) float xs[kMixTok * kMixCols];
    pdl_trigger();
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int64_t c0 = (int64_t)blockIdx.x * kMixCols;
    const int t0 = blockIdx.y * kMixTok;
    X += t0 * x_stride;
    part += (int64_t)t0 * gridDim.x * n_mix;
    n_tok = min(kMixTok, n_tok - t0);
    for (int i = threadIdx.x; i < n_tok * kMixCols / 4; i += blockDim.x) {
        const int t = i / (kMixCols / 4), c = i - t * (kMixCols / 4);
        *(float4*)(xs + t * kMixCols + 4 * c) = *(const float4*)(X + t * x_stride + c0 + 4 * c);
    }
    __syncthreads();
    for (int r = warp; r < n_mix; r += nw) {
        float w[16];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t at = r * cols + c0 + 4 * lane + 128 * j;
            if (fn_type == ds4::TYPE_F32) {
                const float4 v = *(const float4*)((const float*)fn + at);
                w[4 * j] = v.x, w[4 * j + 1] = v.y, w[4 * j + 2] = v.z, w[4 * j + 3] = v.w;
            } else {
                const uint2 raw = *(const uint2*)((const uint16_t*)fn + at);
                const uint32_t h[2] = {raw.x, raw.y};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    if (fn_type == ds4::TYPE_F16) {
                        const float2 f = __half22float2(*(const __half2*)&h[i]);
                        w[4 * j + 2 * i] = f.x, w[4 * j + 2 * i + 1] = f.y;
                    } else {
                        w[4 * j + 2 * i] = __uint_as_float(h[i] << 16);
                        w[4 * j + 2 * i + 1] = __uint_as_float(h[i] & 0xffff0000u);
                    }
                }
            }
        }
        for (int t = 0; t < n_tok; ++t) {
            const float* xr = xs + t * kMixCols + 4 * lane;
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 v = *(const float4*)(xr + 128 * j);
                s0 = fmaf(w[4 * j], v.x, s0), s1 = fmaf(w[4 * j + 1], v.y, s1);
                s0 = fmaf(w[4 * j + 2], v.z, s0), s1 = fmaf(w[4 * j + 3], v.w, s1);
            }
            const float v = warp_sum(s0 + s1);
            if (lane == 0) part[((int64_t)t * gridDim.x + blockIdx.x) * n_mix + r] = v;
        }
    }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// Sum over the 4 lanes of a row (lanes 4r .. 4r + 3) or of a column (lanes c, c + 4, c + 8, c + 12).
__device__ __forceinline__ float row_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float col_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v + __shfl_xor_sync(0xffffffffu, v, 8);
}

// One block per token: mix = (sum of the mixer's partials) / r, gates, Sinkhorn, x = sum_i pre_i X_i. Each
// thread keeps its float4 of every stream (n_embd <= 4 * kHcChunks * blockDim) in registers: the streams are read
// once, for the norm and the sum alike.
constexpr int kHcThreads = 512, kHcChunks = 4;

__global__ void __launch_bounds__(kHcThreads) hc_finish_kernel(float* x, float* hc, const float* mix_part,
                                                                const float* X, int64_t x_stride, const float* scale,
                                                                const float* base, int64_t n_embd, int n_mix,
                                                                int n_iter, float hc_eps, float rms_eps,
                                                                const float* __restrict__ norm_w) {
    __shared__ float red[32];
    __shared__ float pre[kHc];
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* Xt = X + t * x_stride;
    float4 v[kHcChunks][kHc];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (e < n_embd)
#pragma unroll
            for (int i = 0; i < kHc; ++i) v[k][i] = *(const float4*)(Xt + i * n_embd + e);
    }
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (e < n_embd)
#pragma unroll
            for (int i = 0; i < kHc; ++i) {
                ss = fmaf(v[k][i].x, v[k][i].x, ss), ss = fmaf(v[k][i].y, v[k][i].y, ss);
                ss = fmaf(v[k][i].z, v[k][i].z, ss), ss = fmaf(v[k][i].w, v[k][i].w, ss);
            }
    }
    // The mixer's partial sums, added in block order by warp 0 (lane i: row i).
    __shared__ float mr[2 * kHc + kHc * kHc];
    const int n_parts = (int)(kHc * n_embd / kMixCols);
    if (warp == 0 && lane < n_mix) {
        const float* p = mix_part + (int64_t)t * n_parts * n_mix + lane;
        float m = 0.0f;
        for (int b = 0; b < n_parts; ++b) m += p[b * n_mix];
        mr[lane] = m;
    }
    ss = block_sum(ss, red);  // (its barrier also publishes mr)
    const float den = sqrtf(ss / (float)(kHc * n_embd) + rms_eps);
    if (threadIdx.x < kHc) pre[threadIdx.x] = sigmoid(mr[threadIdx.x] / den * scale[0] + base[threadIdx.x]) + hc_eps;
    __syncthreads();
    // The sublayer input needs only the pre weights: every warp writes it while warp 0 (below) runs the Sinkhorn
    // iterations, a serial chain of about 2 us. With norm_w, x is normalized first (the sublayer's RMSNorm).
    float* xt = x + (int64_t)t * n_embd;
    float4 acc[kHcChunks];
    float xs = 0.0f;
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (e < n_embd) {
#pragma unroll
            for (int i = 0; i < kHc; ++i) {
                acc[k].x = fmaf(pre[i], v[k][i].x, acc[k].x), acc[k].y = fmaf(pre[i], v[k][i].y, acc[k].y);
                acc[k].z = fmaf(pre[i], v[k][i].z, acc[k].z), acc[k].w = fmaf(pre[i], v[k][i].w, acc[k].w);
            }
            xs = fmaf(acc[k].x, acc[k].x, xs), xs = fmaf(acc[k].y, acc[k].y, xs);
            xs = fmaf(acc[k].z, acc[k].z, xs), xs = fmaf(acc[k].w, acc[k].w, xs);
        }
    }
    float xden = 1.0f;
    if (norm_w) {
        __syncthreads();  // red is reused
        xden = sqrtf(block_sum(xs, red) / (float)n_embd + rms_eps);
    }
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (e < n_embd) {
            float4 o = acc[k];
            if (norm_w) {
                const float4 g = *(const float4*)(norm_w + e);
                o = make_float4(o.x / xden * g.x, o.y / xden * g.y, o.z / xden * g.z, o.w / xden * g.w);
            }
            *(float4*)(xt + e) = o;
        }
    }
    if (warp == 0 && n_mix > kHc) {
        // post gates (lanes 0-3) and the combine matrix C[r][c] at lane 4 r + c (lanes 0-15).
        float* hct = hc + (int64_t)t * (kHc + kHc * kHc);
        if (lane < kHc) hct[lane] = 2.0f * sigmoid(mr[kHc + lane] / den * scale[1] + base[kHc + lane]);
        const int k = lane & 15;
        float c = mr[2 * kHc + k] / den * scale[2] + base[2 * kHc + k];
        // row softmax, + eps, column normalization; then n_iter - 1 times row and column normalization.
        float mx = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        c = expf(c - mx);
        c = c / row_sum4(c) + hc_eps;
        c = c / (col_sum4(c) + hc_eps);
        for (int it = 1; it < n_iter; ++it) {
            c = c / (row_sum4(c) + hc_eps);
            c = c / (col_sum4(c) + hc_eps);
        }
        if (lane < kHc * kHc) hct[kHc + lane] = c;
    }
}

__global__ void hc_post_kernel(float* Xo, const float* f, const float* X, const float* hc, int n_tok, int64_t n_embd) {
    pdl_trigger();
    pdl_wait();
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_tok * n_embd) return;
    const int64_t t = i / n_embd, e = i - t * n_embd;
    const float* h = hc + t * (kHc + kHc * kHc);
    const float* Xt = X + t * kHc * n_embd + e;
    float xin[kHc];
#pragma unroll
    for (int k = 0; k < kHc; ++k) xin[k] = Xt[k * n_embd];
    const float fe = f[t * n_embd + e];
#pragma unroll
    for (int j = 0; j < kHc; ++j) {
        float v = h[j] * fe;
#pragma unroll
        for (int k = 0; k < kHc; ++k) v = fmaf(h[kHc + kHc * k + j], xin[k], v);
        Xo[t * kHc * n_embd + j * n_embd + e] = v;
    }
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_rms_norm_rope(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                                   const float* w, int64_t n_rows, int64_t n, float eps, const int32_t* pos,
                                   int rows_per_tok, const double* inv_freq, int n_rot) {
    clear_error();
    if (n_rows < 1 || n_rows > 0x7fffffff || n < 4 || n % 4 || n > 4 * kVec * 1024 || x_stride % 4 ||
        y_stride % 4 || (uintptr_t)x % 16 || (uintptr_t)y % 16 || (uintptr_t)w % 16)
        return invalid("rms_norm: rows of a multiple of 4 values (at most 16384), 16-byte aligned, are needed");
    if (pos && (rows_per_tok < 1 || n_rot < 4 || n_rot % 4 || n_rot > n || n_rot > 2048 || !inv_freq))
        return invalid("rms_norm_rope: needs rows_per_tok >= 1 and n_rot a multiple of 4, at most the row and 2048");
    const int threads = (int)std::min<int64_t>(1024, ceil_div(ceil_div(n, 4 * kVec), 32) * 32);
    return launch(rms_norm_kernel, dim3((unsigned)n_rows), dim3(threads), pos ? n_rot * sizeof(float) : 0, s, y,
                  y_stride, x, x_stride, w, n, eps, pos, rows_per_tok, inv_freq, pos ? n_rot : 0);
}

cudaError_t ds4_cuda_rms_norm(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                              const float* w, int64_t n_rows, int64_t n, float eps) {
    return ds4_cuda_rms_norm_rope(s, y, y_stride, x, x_stride, w, n_rows, n, eps, nullptr, 1, nullptr, 0);
}

cudaError_t ds4_cuda_hc_pre(cudaStream_t s, float* x, float* hc, float* scratch, const float* X, int64_t x_stride,
                            const void* fn, int fn_type, const float* scale, const float* base, int n_tok,
                            int64_t n_embd, int n_mix, int n_iter, float hc_eps, float rms_eps,
                            const float* norm_w) {
    clear_error();
    if (n_mix != kHc && n_mix != 2 * kHc + kHc * kHc) return invalid("hc_pre: n_mix must be 4 or 24");
    if (fn_type != ds4::TYPE_F16 && fn_type != ds4::TYPE_F32 && fn_type != ds4::TYPE_BF16)
        return invalid("hc_pre: fn must be F16, F32 or BF16");
    if (n_tok < 1 || n_tok > 65535 * kMixTok || (kHc * n_embd) % kMixCols || n_embd > 4 * kHcChunks * kHcThreads ||
        x_stride % 4 || (uintptr_t)fn % 16 || (uintptr_t)X % 16 || (uintptr_t)x % 16 || (uintptr_t)norm_w % 16 ||
        n_iter < 1 || (n_mix > kHc && !hc))
        return invalid("hc_pre: needs 1 <= n_tok <= 1048560, n_embd a multiple of 128 up to 8192, aligned rows, "
                       "n_iter >= 1");
    const int n_parts = (int)(kHc * n_embd / kMixCols);
    cudaError_t e = launch(hc_mix_kernel, dim3(n_parts, (unsigned)ceil_div(n_tok, kMixTok)), dim3(256), 0, s,
                           scratch, X, x_stride, fn, fn_type, n_mix, kHc * n_embd, n_tok);
    if (e != cudaSuccess) return e;
    return launch(hc_finish_kernel, dim3(n_tok), dim3(kHcThreads), 0, s, x, hc, (const float*)scratch, X, x_stride,
                  scale, base, n_embd, n_mix, n_iter, hc_eps, rms_eps, norm_w);
}

cudaError_t ds4_cuda_hc_post(cudaStream_t s, float* X_out, const float* f, const float* X, const float* hc,
                             int n_tok, int64_t n_embd) {
    clear_error();
    if (n_tok < 1 || n_embd < 1) return invalid("hc_post: empty");
    const int64_t n = n_tok * n_embd;
    return launch(hc_post_kernel, dim3((unsigned)ceil_div(n, 256)), dim3(256), 0, s, X_out, f, X, hc, n_tok, n_embd);
}

size_t ds4_cuda_hc_pre_scratch_bytes(int n_tok, int64_t n_embd, int n_mix) {
    return (size_t)n_tok * ceil_div(kHc * n_embd, kMixCols) * n_mix * sizeof(float);
}
