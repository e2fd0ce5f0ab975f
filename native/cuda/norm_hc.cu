// RMSNorm and the hyper-connection steps around each sublayer (MODEL.md 3.2, 3.3, 3.5).
//
// rms_norm: one block per row. hc_pre: the 24-row mixer product runs on the unnormalized streams, split over its
// 16384 columns (hc_mix_kernel, its weights loaded before the dependent-launch wait), and each column block also
// leaves the sum of squares of its columns. A second kernel per token (hc_finish_kernel) has a control warp add
// the partial sums, which give the norm of the streams too (RMSNorm without weight is one scalar per token, so
// fn . (X / r) = (fn . X) / r), take the sigmoid gates and run the 20-iteration Sinkhorn normalization (the 4x4
// matrix in one thread's registers: no shuffles), while its other warps form the weighted sum of the streams.
// hc_post: one thread per position e computes all 4 new streams from the 4 old ones, so it may work in place. The
// same update also runs inside the next sublayer's mixer (hc_pre with `post`): each mixer block computes the new
// streams at the positions whose columns it multiplies, writes them and goes on with them, so that the update
// costs no launch and no memory trip of its own. On sm_90 a decode step's few tokens take one launch instead of
// the mixer and the finish (hc_pre_cluster_kernel: a thread block cluster per token). With `defer` either path
// leaves the combine matrix as its logits, and hc_sinkhorn_kernel (one thread per token) runs the iterations
// later, on a stream beside the sublayer, or an idle warp of the routed gate+up does (moe.cu; hc.cuh holds the
// iterations): their ~1.6 us of one thread's dependent arithmetic then delay nothing on the decode chain.
#include "common.cuh"
#include "hc.cuh"
#include "numerics.cuh"

namespace ds4::cuda {
namespace {

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
// it: the fused norm + RoPE of the query heads and the K=V row. Two sets of rows may share a launch (the query
// heads and the K=V row): blocks [0, n_first) take set 0's rows, the rest set 1's.
struct NormRows {
    float* y;
    int64_t y_stride;
    const float* x;
    int64_t x_stride;
    const float* w;
    int rows_per_tok;
};

__global__ void rms_norm_kernel(NormRows set0, NormRows set1, int64_t n_first, int64_t n, float eps,
                                const int32_t* pos, const double* inv_freq, int n_rot) {
    __shared__ float red[32];
    extern __shared__ float cs[];  // with pos: cos[n_rot / 2], sin[n_rot / 2]
    pdl_trigger();
    const bool first = blockIdx.x < n_first;
    const int64_t row = first ? blockIdx.x : blockIdx.x - n_first;
    const NormRows& set = first ? set0 : set1;
    const float* __restrict__ w = set.w;
    pdl_wait();
    const int half = n_rot / 2;
    if (pos)
        for (int j = threadIdx.x; j < half; j += blockDim.x)
            rope_angle(pos[row / set.rows_per_tok], inv_freq[j], cs[j], cs[half + j]);
    const float* xr = set.x + row * set.x_stride;
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
    for (int k = 0; k < kVec; ++k)
        if (4 * (threadIdx.x + (int64_t)blockDim.x * k) < n) ss = sumsq4(v[k], ss);
    const float inv = 1.0f / sqrtf(block_sum(ss, red) / (float)n + eps);
    float* yr = set.y + row * set.y_stride;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
        const int64_t i = 4 * (threadIdx.x + (int64_t)blockDim.x * k);
        if (i < n) *(float4*)(yr + i) = norm_rope4(v[k], inv, w ? &g[k] : nullptr, i, n, n_rot, cs);
    }
}

// The HC mixer product, split over the columns: block (b, y) takes positions [128 b, 128 b + 128) of all 4 streams
// (columns j n_embd + 128 b .. + 127 of the 4 * n_embd for j < 4: the 512 columns of every position it holds), all
// n_mix rows and tokens 16 y .. 16 y + 15, and leaves partial sums that hc_finish adds: per token n_mix + 1 rows
// of n_blocks values (padded to part_stride), the n_mix row products and then the sum of squares of the block's
// columns (for the norm of the streams). (24 rows of 16384 give a row-walking product too few rows to spread over
// the GPU: 12-24 blocks.) Warp w takes rows w, w + 8, w + 16 and holds their weights in registers, loaded before
// the dependent-launch wait (they do not come from the previous kernel, so they load while it finishes); the
// block's activation columns then sit in shared memory, stream j's at 128 j. Lane i takes columns 4 i + 128 j ..
// + 3 for j < 4 (consecutive lanes read consecutive 16-byte pieces: no bank conflicts; 16 consecutive columns per
// lane were a 4-way conflict on every load, which made the prefill's hc_pre slow). Per token a warp reduces 4
// values at once: its 3 row products and, in warp t % 8, token t's sum of squares. With the previous sublayer's
// update (`post`), the block first computes its positions' new streams from the old ones (hc_update, as hc_post
// does), writes them to X and stages them.
constexpr int kMixCols = 512, kMixPos = kMixCols / kHc;  // columns and positions per block
constexpr int kMixTok = 16, kMixThreads = 256, kMixWarps = kMixThreads / 32;
constexpr int kMixRows = 3;  // rows per warp
static_assert(kMixRows * kMixWarps >= 2 * kHc + kHc * kHc, "hc_mix: 24 rows need 3 per warp");
static_assert(kMixRows + 1 == 4, "hc_mix: a warp reduces its rows and a sum of squares with warp_sums");

// A token's partials of one row (or of the sum of squares) are contiguous, padded to whole float4s: hc_finish
// reads them with 16-byte loads.
__host__ __device__ constexpr int part_stride(int n_blocks) { return (n_blocks + 3) / 4 * 4; }

// sum_j w[j] * x[j] over a lane's 16 columns (two chains).
__device__ __forceinline__ float dot16(const float (&w)[16], const float4 (&x)[4]) {
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        s0 = fmaf(w[4 * j], x[j].x, s0), s1 = fmaf(w[4 * j + 1], x[j].y, s1);
        s0 = fmaf(w[4 * j + 2], x[j].z, s0), s1 = fmaf(w[4 * j + 3], x[j].w, s1);
    }
    return s0 + s1;
}

// sum_j x[j]^2 over a lane's 16 columns (two chains).
__device__ __forceinline__ float sumsq16(const float4 (&x)[4]) {
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        s0 = fmaf(x[j].x, x[j].x, s0), s1 = fmaf(x[j].y, x[j].y, s1);
        s0 = fmaf(x[j].z, x[j].z, s0), s1 = fmaf(x[j].w, x[j].w, s1);
    }
    return s0 + s1;
}

// The previous sublayer's update of stream j at one position (MODEL.md 3.3): post_j f + sum_i comb[i][j] X_i, with
// h the token's 20 values (post gates, then comb row-major). hc_post and the mixer both compute it here.
__device__ __forceinline__ float hc_update(const float* h, int j, float f, float x0, float x1, float x2, float x3) {
    static_assert(kHc == 4, "hc_update: 4 streams");
    float v = h[j] * f;
    v = fmaf(h[4 + j], x0, v), v = fmaf(h[8 + j], x1, v), v = fmaf(h[12 + j], x2, v);
    return fmaf(h[16 + j], x3, v);
}

// (Bounded to 3 blocks per SM, 80 registers, which the 48 weights fit without spills; unbounded, ptxas takes 84 and
// leaves 2.)
__global__ void __launch_bounds__(kMixThreads, 3) hc_mix_kernel(float* part, float* X, int64_t x_stride,
                                                                ds4_cuda_hc_post_in up, const void* fn, int fn_type,
                                                                int n_mix, int64_t n_embd, int n_tok) {
    __shared__ __align__(16) float xs[kMixTok * kMixCols];
    __shared__ __align__(16) float fs[kMixTok * kMixPos], hs[kMixTok * kHcVals];  // the update's f and values
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t e0 = (int64_t)blockIdx.x * kMixPos, cols = kHc * n_embd;
    // All weight loads are issued before the wait (rows past n_mix, which the output head's n_mix = 4 leaves, are
    // 0); F16 / BF16 ones are widened once the activations are on their way.
    float w[kMixRows][16];
    uint2 h[kMixRows][4];
    const bool f32 = fn_type == ds4::TYPE_F32;
#pragma unroll
    for (int q = 0; q < kMixRows; ++q) {
        const int r = warp + kMixWarps * q;
        const int64_t at = r * cols + e0 + 4 * lane;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (f32) {
                const float4 v = r < n_mix ? *(const float4*)((const float*)fn + at + j * n_embd) : float4{};
                w[q][4 * j] = v.x, w[q][4 * j + 1] = v.y, w[q][4 * j + 2] = v.z, w[q][4 * j + 3] = v.w;
            } else {
                h[q][j] = r < n_mix ? *(const uint2*)((const uint16_t*)fn + at + j * n_embd) : uint2{};
            }
        }
    }
    pdl_wait();
    const int t0 = blockIdx.y * kMixTok;
    X += t0 * x_stride;
    n_tok = min(kMixTok, n_tok - t0);
    // The streams' columns (with the update: the old streams, its output f and its values per token) to shared
    // memory; stream j's positions at 128 j.
    const float* src = up.f ? up.X + t0 * x_stride : X;
    for (int i = threadIdx.x; i < n_tok * kMixCols / 4; i += kMixThreads) {
        const int t = i / (kMixCols / 4), c = i - t * (kMixCols / 4), j = c / (kMixPos / 4);
        cp_async16(xs + t * kMixCols + 4 * c, src + t * x_stride + j * n_embd + e0 + 4 * c - kMixPos * j);
    }
    if (up.f) {
        for (int i = threadIdx.x; i < n_tok * kMixPos / 4; i += kMixThreads) {
            const int t = i / (kMixPos / 4), c = i - t * (kMixPos / 4);
            cp_async16(fs + t * kMixPos + 4 * c, up.f + (t0 + t) * n_embd + e0 + 4 * c);
        }
        for (int i = threadIdx.x; i < n_tok * kHcVals / 4; i += kMixThreads)
            cp_async16(hs + 4 * i, up.hc + t0 * kHcVals + 4 * i);
    }
    cp_async_commit();
    if (!f32) {
#pragma unroll
        for (int q = 0; q < kMixRows; ++q)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t u[2] = {h[q][j].x, h[q][j].y};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    if (fn_type == ds4::TYPE_F16) {
                        const float2 f = __half22float2(*(const __half2*)&u[i]);
                        w[q][4 * j + 2 * i] = f.x, w[q][4 * j + 2 * i + 1] = f.y;
                    } else {
                        w[q][4 * j + 2 * i] = __uint_as_float(u[i] << 16);
                        w[q][4 * j + 2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
                    }
                }
            }
    }
    cp_async_wait<0>();
    __syncthreads();
    if (up.f) {
        // The update at each (token, position): the 4 old values in, the 4 new ones to shared memory and X (all
        // four read before any is written: X may be the old streams).
        for (int i = threadIdx.x; i < n_tok * kMixPos; i += kMixThreads) {
            const int t = i / kMixPos, c = i - t * kMixPos;
            float* xt = xs + t * kMixCols + c;
            const float f = fs[i], x0 = xt[0], x1 = xt[kMixPos], x2 = xt[2 * kMixPos], x3 = xt[3 * kMixPos];
#pragma unroll
            for (int j = 0; j < kHc; ++j) {
                const float v = hc_update(hs + t * kHcVals, j, f, x0, x1, x2, x3);
                xt[j * kMixPos] = v;
                X[t * x_stride + j * n_embd + e0 + c] = v;
            }
        }
        __syncthreads();
    }
    // Lane 8 k stores value k: row warp + 8 k for k < 3, the sum of squares (warp t % 8) for k = 3.
    const int k = lane / 8, r = warp + kMixWarps * k;
    const bool row_out = lane % 8 == 0 && k < kMixRows && r < n_mix;
    const int64_t out_step = (int64_t)(n_mix + 1) * part_stride(gridDim.x);  // per token
    float* out = part + t0 * out_step + (int64_t)(k < kMixRows ? r : n_mix) * part_stride(gridDim.x) + blockIdx.x;
    for (int t = 0; t < n_tok; ++t) {
        float4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = *(const float4*)(xs + t * kMixCols + 4 * lane + 128 * j);
        const bool ss = t % kMixWarps == warp;
        float s[kMixRows + 1];
#pragma unroll
        for (int q = 0; q < kMixRows; ++q) s[q] = dot16(w[q], v);
        s[kMixRows] = ss ? sumsq16(v) : 0.0f;
        const float sum = warp_sums(s);
        if (row_out || (ss && lane == 8 * kMixRows)) out[t * out_step] = sum;
    }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// What hc_finish and hc_pre_cluster_kernel both do with a token's mixer sums, so that the two paths agree: lane r
// takes row r's scale and base (rows 0-3 the pre gates, 4-7 the post gates, 8-23 the combine logits), then its
// logit z = m / rms(streams) * scale + base from its row sum m and the streams' sum of squares in lane n_mix.
__device__ __forceinline__ void hc_row_weights(int r, const float* scale, const float* base, float& sc, float& b) {
    sc = scale[r < kHc ? 0 : r < 2 * kHc ? 1 : 2], b = base[r];
}
__device__ __forceinline__ float hc_logit(float m, int n_mix, int64_t cols, float rms_eps, float sc, float b) {
    const float den = sqrtf(__shfl_sync(0xffffffffu, m, n_mix) / (float)cols + rms_eps);
    return m / den * sc + b;
}

// Named barriers of hc_finish: the control warp publishes the pre gates with bar.arrive (it does not wait for the
// stream warps) and takes no part in the stream warps' reduction.
__device__ __forceinline__ void bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// sinkhorn, then the normalized matrix (row-major) to out by lane 0 of the calling warp.
__device__ __forceinline__ void sinkhorn_store(float (&c)[kHc][kHc], int n_iter, float eps, float* out) {
    sinkhorn(c, n_iter, eps);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int i = 0; i < kHc * kHc; ++i) out[i] = c[i / kHc][i % kHc];
}

// One block per token: kHcThreads stream threads and a control warp. The control warp adds the mixer's partials
// (lane i: row i; lane n_mix: the sum of squares, so the norm of the streams r needs no block reduction), takes
// mix = sum / r and the gates, publishes the pre gates (barrier 1), then writes the post gates and runs the Sinkhorn
// iterations. Meanwhile each stream thread has loaded its float4 of every stream (n_embd <= 4 * kHcChunks *
// kHcThreads); it then forms x = sum_i pre_i X_i (with norm_w, RMS-normalized: a reduction over the stream warps
// alone, barrier 2).
constexpr int kHcThreads = 512, kHcChunks = 4;
constexpr int kHcParts = kHc * 4 * kHcChunks * kHcThreads / kMixCols;  // mixer blocks at the largest n_embd

// Sum over the stream threads of hc_finish.
__device__ __forceinline__ float stream_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    bar_sync(2, kHcThreads);
    v = lane < kHcThreads / 32 ? red[lane] : 0.0f;
    return warp_sum(v);
}

__global__ void __launch_bounds__(kHcThreads + 32) hc_finish_kernel(float* x, float* hc, const float* mix_part,
                                                                     const float* X, int64_t x_stride,
                                                                     const float* scale, const float* base,
                                                                     int64_t n_embd, int n_mix, int n_iter,
                                                                     float hc_eps, float rms_eps,
                                                                     const float* __restrict__ norm_w,
                                                                     bool defer) {
    __shared__ float red[kHcThreads / 32];
    __shared__ float pre[kHc];
    pdl_trigger();
    const int t = blockIdx.x, lane = threadIdx.x & 31;
    if (threadIdx.x >= kHcThreads) {
        // The control warp. Lane i's scale and base are weights: read before the wait.
        float sc = 0.0f, b = 0.0f;
        if (lane < n_mix) hc_row_weights(lane, scale, base, sc, b);
        pdl_wait();
        const int n_parts = (int)(kHc * n_embd / kMixCols), stride = part_stride(n_parts);
        const float4* p = (const float4*)(mix_part + ((int64_t)t * (n_mix + 1) + lane) * stride);
        float4 part[kHcParts / 4];  // all loads first
#pragma unroll
        for (int i = 0; i < kHcParts / 4; ++i) part[i] = lane <= n_mix && 4 * i < n_parts ? p[i] : float4{};
        // Then the sum in a fixed order (deterministic): 4 chains, blocks b = 0, 1, 2, 3 mod 4, then sum4.
        float s[4] = {};
#pragma unroll
        for (int i = 0; i < kHcParts; ++i)
            if (i < n_parts) s[i % 4] += ((const float*)part)[i];
        const float m = sum4(s[0], s[1], s[2], s[3]);
        const float z = hc_logit(m, n_mix, kHc * n_embd, rms_eps, sc, b), gate = sigmoid(z);  // pre 0-3, post 4-7
        if (lane < kHc) pre[lane] = gate + hc_eps;
        bar_arrive(1, kHcThreads + 32);
        if (n_mix > kHc) {
            // post gates, then the combine matrix C[r][c] (logits at lane 8 + 4 r + c) in every lane.
            float* hct = hc + (int64_t)t * kHcVals;
            if (lane >= kHc && lane < 2 * kHc) hct[lane - kHc] = 2.0f * gate;
            if (defer) {  // the logits, for hc_sinkhorn_kernel
                if (lane >= 2 * kHc && lane < n_mix) hct[lane - kHc] = z;
                return;
            }
            float c[kHc][kHc];
#pragma unroll
            for (int i = 0; i < kHc * kHc; ++i) c[i / kHc][i % kHc] = __shfl_sync(0xffffffffu, z, 2 * kHc + i);
            sinkhorn_store(c, n_iter, hc_eps, hct + kHc);
        }
        return;
    }
    // A stream thread: its norm_w (a weight) before the wait, then its float4 of every stream.
    const float* Xt = X + t * x_stride;
    float4 g[kHcChunks], v[kHcChunks][kHc];
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)kHcThreads * k);
        if (norm_w && e < n_embd) g[k] = *(const float4*)(norm_w + e);
    }
    pdl_wait();
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)kHcThreads * k);
        if (e < n_embd)
#pragma unroll
            for (int i = 0; i < kHc; ++i) v[k][i] = *(const float4*)(Xt + i * n_embd + e);
    }
    bar_sync(1, kHcThreads + 32);  // pre, from the control warp
    float* xt = x + (int64_t)t * n_embd;
    float4 acc[kHcChunks];
    float xs = 0.0f;
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)kHcThreads * k);
        acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (e < n_embd) {
#pragma unroll
            for (int i = 0; i < kHc; ++i) {
                acc[k].x = fmaf(pre[i], v[k][i].x, acc[k].x), acc[k].y = fmaf(pre[i], v[k][i].y, acc[k].y);
                acc[k].z = fmaf(pre[i], v[k][i].z, acc[k].z), acc[k].w = fmaf(pre[i], v[k][i].w, acc[k].w);
            }
            xs = sumsq4(acc[k], xs);
        }
    }
    const float xden = norm_w ? sqrtf(stream_sum(xs, red) / (float)n_embd + rms_eps) : 1.0f;
#pragma unroll
    for (int k = 0; k < kHcChunks; ++k) {
        const int64_t e = 4 * (threadIdx.x + (int64_t)kHcThreads * k);
        if (e < n_embd) {
            float4 o = acc[k];
            if (norm_w)
                o = make_float4(o.x / xden * g[k].x, o.y / xden * g[k].y, o.z / xden * g[k].z, o.w / xden * g[k].w);
            *(float4*)(xt + e) = o;
        }
    }
}

// hc_pre of a few tokens in one launch (sm_90, decode): a thread block cluster per token (blockIdx.y) of C = n_embd
// / 256 blocks, 16 at n_embd 4096. Block `rank` takes positions [256 rank, 256 rank + 256) of the 4 streams (1024
// columns, stream j's at 256 j in shared memory): with the previous sublayer's update it computes their new streams
// first (hc_update, as hc_post does), then the 24 row products, the sum of squares of its columns and the streams'
// Gram matrix over its positions, which it stores into every block of the cluster (distributed shared memory).
// After the cluster's barrier every block adds the C partials in one order, so all find the same gates, and forms x
// at its positions. x's norm needs no second exchange: sum_e x_e^2 = sum_ab pre_a pre_b G_ab, with G the Gram
// matrix summed over the cluster. Block 0 writes the post gates and the combine matrix: with `defer` its logits, for
// the 20 Sinkhorn iterations to run elsewhere (in one thread: ~1.6 us that the chain no longer waits for); else its
// last warp runs them. Against the mixer and hc_finish launches: one launch, no partials through global memory.
// With xq, x also as Q8_0 activations (each warp's 32 positions are one block): the next product's quantize launch.
// Warp w takes rows w % 8, w % 8 + 8, w % 8 + 16 over the block's column half w / 8; lane i columns 4 i + 128 j ..
// + 3 of that half (j < 4: conflict-free 16-byte loads, as in hc_mix_kernel); its 48 f16 weights stay packed in
// registers, loaded before the dependent-launch wait, and are widened at use. Half h holds streams 2 h and 2 h + 1
// at all the block's positions; warps 1-5 of each half (whose fourth sum is free: warp 0's is the sum of squares)
// each add one Gram entry, streams (a, b) = kClGram's nibbles, reading both from shared memory.
constexpr int kClPos = 256, kClCols = kHc * kClPos, kClThreads = 512, kClMax = 16, kClMaxTok = 8;
constexpr int kClMix = 2 * kHc + kHc * kHc + 1;  // per block: the 24 row products, then the sum of squares
constexpr int kClGramN = kHc * (kHc + 1) / 2;    // then the Gram entries G_ab, a <= b
constexpr int kClVals = kClMix + kClGramN;
// Entry k = 5 h + w - 1 (half h, warp w of it): streams a = bits 4k + 2.., b = bits 4k..; every a <= b once.
constexpr uint64_t kClGram = 0x76FBA32510ull;
__device__ __forceinline__ int gram_a(int k) { return (int)(kClGram >> (4 * k + 2)) & 3; }
__device__ __forceinline__ int gram_b(int k) { return (int)(kClGram >> (4 * k)) & 3; }

__global__ void __launch_bounds__(kClThreads, 2)
    hc_pre_cluster_kernel(float* x, float* hc, float* X, int64_t x_stride, ds4_cuda_hc_post_in up, const __half* fn,
                          const float* scale, const float* base, int64_t n_embd, int n_iter, float hc_eps,
                          float rms_eps, const float* __restrict__ norm_w, bool defer, ds4_cuda_q8_out xq) {
    __shared__ __align__(16) float xs[kClCols];
    __shared__ __align__(16) float fs[kClPos], hs[kHcVals];  // the update's f and values
    __shared__ float halves[2][kClMix], gram[kClGramN];       // this block's sums per column half; its Gram matrix
    __shared__ float parts[kClMax][kClVals];                  // every block's sums, stored by that block
    __shared__ float pre[kHc], gsum[kClGramN], zs[kHc * kHc];
    pdl_trigger();
    cluster_arrive_relaxed();  // the exchange waits until every block of the cluster has started
    const int C = gridDim.x, rank = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rg = warp % 8, ch = warp / 8;
    const int64_t cols = kHc * n_embd, e0 = (int64_t)rank * kClPos;
    // Weights before the wait: the mixer's rows, the norm's weight, the gates' scale and base.
    uint2 wr[kMixRows][4];
#pragma unroll
    for (int q = 0; q < kMixRows; ++q)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = 512 * ch + 4 * lane + 128 * j;
            wr[q][j] = *(const uint2*)(fn + (rg + 8 * q) * cols + (c / kClPos) * n_embd + e0 + c % kClPos);
        }
    const float g = norm_w && tid < kClPos ? norm_w[e0 + tid] : 1.0f;
    float sc = 0.0f, b = 0.0f;
    if (warp == 0 && lane < kClMix - 1) hc_row_weights(lane, scale, base, sc, b);
    pdl_wait();
    float* Xt = X + t * x_stride;
    const float* src = up.f ? up.X + t * x_stride : Xt;
    const int i4 = 4 * tid;  // a thread's 16 bytes: of the streams' columns, then f's positions, then hc's values
    if (i4 < kClCols)
        cp_async16(xs + i4, src + (i4 / kClPos) * n_embd + e0 + i4 % kClPos);
    else if (up.f && i4 < kClCols + kClPos)
        cp_async16(fs + (i4 - kClCols), up.f + t * n_embd + e0 + (i4 - kClCols));
    else if (up.f && i4 < kClCols + kClPos + kHcVals)
        cp_async16(hs + (i4 - kClCols - kClPos), up.hc + t * kHcVals + (i4 - kClCols - kClPos));
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (up.f) {
        if (tid < kClPos) {
            const float f = fs[tid], x0 = xs[tid], x1 = xs[kClPos + tid], x2 = xs[2 * kClPos + tid],
                        x3 = xs[3 * kClPos + tid];
#pragma unroll
            for (int j = 0; j < kHc; ++j) xs[j * kClPos + tid] = hc_update(hs, j, f, x0, x1, x2, x3);
        }
        __syncthreads();
    }
    {
        const int off = 4 * lane;
        float4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = *(const float4*)(xs + 512 * ch + off + 128 * j);
        float s[kMixRows + 1];
#pragma unroll
        for (int q = 0; q < kMixRows; ++q) {
            float w[16];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 a = __half22float2(*(const __half2*)&wr[q][j].x);
                const float2 c = __half22float2(*(const __half2*)&wr[q][j].y);
                w[4 * j] = a.x, w[4 * j + 1] = a.y, w[4 * j + 2] = c.x, w[4 * j + 3] = c.y;
            }
            s[q] = dot16(w, v);
        }
        const int gk = 5 * ch + rg - 1;  // this warp's Gram entry, for rg 1..5
        if (rg == 0) {
            s[kMixRows] = sumsq16(v);
        } else if (rg <= 5) {
            const float* pa = xs + kClPos * gram_a(gk) + off;
            const float* pb = xs + kClPos * gram_b(gk) + off;
            float s0 = 0.0f, s1 = 0.0f;  // over the lane's 8 positions, two chains
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const float4 va = *(const float4*)(pa + 128 * j), vb = *(const float4*)(pb + 128 * j);
                s0 = fmaf(va.x, vb.x, s0), s1 = fmaf(va.y, vb.y, s1);
                s0 = fmaf(va.z, vb.z, s0), s1 = fmaf(va.w, vb.w, s1);
            }
            s[kMixRows] = s0 + s1;
        } else {
            s[kMixRows] = 0.0f;
        }
        const float sum = warp_sums(s);  // lane 8 k: row rg + 8 k (k < 3), the fourth sum (k = 3)
        const int k = lane / 8;
        if (lane % 8 == 0 && k < kMixRows) halves[ch][rg + 8 * k] = sum;
        if (lane == 8 * kMixRows && rg == 0) halves[ch][kClMix - 1] = sum;
        if (lane == 8 * kMixRows && rg >= 1 && rg <= 5) gram[gk] = sum;
    }
    __syncthreads();
    cluster_wait();
    for (int i = tid; i < C * kClVals; i += kClThreads) {
        const int d = i / kClVals, r = i - d * kClVals;
        *cluster_at(&parts[rank][r], d) = r < kClMix ? halves[0][r] + halves[1][r] : gram[r - kClMix];
    }
    cluster_arrive();
    cluster_wait();  // no block reads another's shared memory after this: each may finish on its own
    float gate = 0.0f, z = 0.0f;
    if (warp == 0) {
        // The gates, as hc_finish's control warp takes them: lane r adds row r's partials in 4 chains.
        float s[4] = {};
#pragma unroll
        for (int i = 0; i < kClMax; ++i)
            if (i < C && lane < kClMix) s[i % 4] += parts[i][lane];
        const float m = sum4(s[0], s[1], s[2], s[3]);
        z = hc_logit(m, kClMix - 1, cols, rms_eps, sc, b);
        gate = sigmoid(z);  // pre at lanes 0-3, post at 4-7, comb logits at 8-23
        if (lane < kHc) pre[lane] = gate + hc_eps;
        if (lane >= 2 * kHc && lane < kClMix - 1) zs[lane - 2 * kHc] = z;
    } else if (warp == 1 && lane < kClGramN) {  // the Gram matrix over the cluster, in the same 4 chains
        float s[4] = {};
#pragma unroll
        for (int i = 0; i < kClMax; ++i)
            if (i < C) s[i % 4] += parts[i][kClMix + lane];
        gsum[lane] = sum4(s[0], s[1], s[2], s[3]);
    }
    __syncthreads();
    if (tid < kClPos) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < kHc; ++i) acc = fmaf(pre[i], xs[i * kClPos + tid], acc);
        float xden = 1.0f;
        if (norm_w) {
            float ss = 0.0f;  // sum_ab pre_a pre_b G_ab
#pragma unroll
            for (int k = 0; k < kClGramN; ++k) {
                const int a = gram_a(k), c = gram_b(k);
                ss = fmaf((a == c ? 1.0f : 2.0f) * pre[a] * pre[c], gsum[k], ss);
            }
            xden = sqrtf(fmaxf(ss, 0.0f) / (float)n_embd + rms_eps);
        }
        const float v = norm_w ? acc / xden * g : acc;
        x[t * n_embd + e0 + tid] = v;
        if (xq.qs) {  // warp w's 32 positions are one Q8_0 block: its amax over the warp, quantize_rows' rounding
            float d;
            const float inv = q8_0_inv(warp_max(fmaxf(0.0f, fabsf(v))), d);
            xq.qs[t * n_embd + e0 + tid] = (int8_t)q8_0_value(v, inv);
            if (lane == 0) xq.d[(t * n_embd + e0 + tid) / 32] = d;
        }
        if (up.f)
#pragma unroll
            for (int j = 0; j < kHc; ++j) Xt[j * n_embd + e0 + tid] = xs[j * kClPos + tid];
    } else if (rank == 0 && warp == kClThreads / 32 - 1 && !defer) {  // a warp the stream work leaves idle
        float c[kHc][kHc];
#pragma unroll
        for (int i = 0; i < kHc * kHc; ++i) c[i / kHc][i % kHc] = zs[i];
        sinkhorn_store(c, n_iter, hc_eps, hc + t * kHcVals + kHc);
    }
    if (rank == 0 && warp == 0 && lane >= kHc && lane < 2 * kHc) hc[t * kHcVals + lane - kHc] = 2.0f * gate;
    if (rank == 0 && warp == 0 && defer && lane >= 2 * kHc && lane < kClMix - 1) hc[t * kHcVals + lane - kHc] = z;
}

// The combine matrices that hc_pre left as logits (`defer`) normalized in place, as hc_pre would have: a thread per
// token.
__global__ void hc_sinkhorn_kernel(float* hc, int n_tok, int n_iter, float hc_eps) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n_tok) sinkhorn_logits(hc + (int64_t)t * kHcVals, n_iter, hc_eps);
}

__global__ void hc_post_kernel(float* Xo, const float* f, const float* X, const float* hc, int n_tok, int64_t n_embd) {
    pdl_trigger();
    pdl_wait();
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_tok * n_embd) return;
    const int64_t t = i / n_embd, e = i - t * n_embd;
    const float* h = hc + t * kHcVals;
    const float* Xt = X + t * kHc * n_embd + e;
    float xin[kHc];
#pragma unroll
    for (int k = 0; k < kHc; ++k) xin[k] = Xt[k * n_embd];
    const float fe = f[t * n_embd + e];
#pragma unroll
    for (int j = 0; j < kHc; ++j)
        Xo[t * kHc * n_embd + j * n_embd + e] = hc_update(h, j, fe, xin[0], xin[1], xin[2], xin[3]);
}

// The blocks per cluster with which hc_pre takes hc_pre_cluster_kernel, or 0: an sm_90 device, 24 rows of f16
// weights, n_embd a multiple of 256 up to 4096, and at most kClMaxTok tokens, whose clusters all fit on the device
// at once (asked once per cluster size).
int cluster_blocks(int n_tok, int64_t n_embd, int n_mix, int fn_type) {
    if (props().cc < 90 || n_mix != 2 * kHc + kHc * kHc || fn_type != ds4::TYPE_F16 || n_embd % kClPos ||
        n_embd / kClPos > kClMax || n_tok > kClMaxTok)
        return 0;
    const int c = (int)(n_embd / kClPos);
    static int fit[kClMax + 1] = {};  // clusters of c blocks that fit at once, + 1 (0: not asked yet)
    if (!fit[c]) fit[c] = cluster_fit(hc_pre_cluster_kernel, dim3(c), dim3(kClThreads), 0) + 1;
    return n_tok < fit[c] ? c : 0;
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_rms_norm_rope(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                                   const float* w, int64_t n_rows, int64_t n, float eps, const int32_t* pos,
                                   int rows_per_tok, const double* inv_freq, int n_rot, const ds4_cuda_rows* also) {
    clear_error();
    const ds4_cuda_rows none{};
    const ds4_cuda_rows& b = also ? *also : none;
    const int64_t total = n_rows + b.n_rows;
    if (n_rows < 1 || b.n_rows < 0 || total > 0x7fffffff || n < 4 || n % 4 || n > 4 * kVec * 1024 ||
        (x_stride | y_stride | b.x_stride | b.y_stride) % 4 ||
        ((uintptr_t)x | (uintptr_t)y | (uintptr_t)w | (uintptr_t)b.x | (uintptr_t)b.y | (uintptr_t)b.w) % 16)
        return invalid("rms_norm: rows of a multiple of 4 values (at most 16384), 16-byte aligned, are needed");
    if (pos && (rows_per_tok < 1 || (b.n_rows && b.rows_per_tok < 1) || n_rot < 4 || n_rot % 4 || n_rot > n ||
                n_rot > 2048 || !inv_freq))
        return invalid("rms_norm_rope: needs rows_per_tok >= 1 and n_rot a multiple of 4, at most the row and 2048");
    const int threads = (int)std::min<int64_t>(1024, ceil_div(ceil_div(n, 4 * kVec), 32) * 32);
    return launch(rms_norm_kernel, dim3((unsigned)total), dim3(threads), pos ? n_rot * sizeof(float) : 0, s,
                  NormRows{y, y_stride, x, x_stride, w, rows_per_tok},
                  NormRows{b.y, b.y_stride, b.x, b.x_stride, b.w, b.rows_per_tok}, n_rows, n, eps, pos, inv_freq,
                  pos ? n_rot : 0);
}

cudaError_t ds4_cuda_rms_norm(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                              const float* w, int64_t n_rows, int64_t n, float eps) {
    return ds4_cuda_rms_norm_rope(s, y, y_stride, x, x_stride, w, n_rows, n, eps, nullptr, 1, nullptr, 0);
}

cudaError_t ds4_cuda_hc_pre(cudaStream_t s, float* x, float* hc, float* scratch, float* X, int64_t x_stride,
                            const void* fn, int fn_type, const float* scale, const float* base, int n_tok,
                            int64_t n_embd, int n_mix, int n_iter, float hc_eps, float rms_eps,
                            const float* norm_w, const ds4_cuda_hc_post_in* post, bool defer,
                            const ds4_cuda_q8_out* xq) {
    clear_error();
    if (n_mix != kHc && n_mix != 2 * kHc + kHc * kHc) return invalid("hc_pre: n_mix must be 4 or 24");
    if (fn_type != ds4::TYPE_F16 && fn_type != ds4::TYPE_F32 && fn_type != ds4::TYPE_BF16)
        return invalid("hc_pre: fn must be F16, F32 or BF16");
    if (n_tok < 1 || n_tok > 65535 * kMixTok || (kHc * n_embd) % kMixCols || n_embd > 4 * kHcChunks * kHcThreads ||
        x_stride % 4 || (uintptr_t)fn % 16 || (uintptr_t)X % 16 || (uintptr_t)x % 16 || (uintptr_t)norm_w % 16 ||
        (uintptr_t)scratch % 16 || n_iter < 1 || (n_mix > kHc && !hc) ||
        (post && (!post->f || !post->X || !post->hc ||
                  ((uintptr_t)post->f | (uintptr_t)post->X | (uintptr_t)post->hc) % 16)))
        return invalid("hc_pre: needs 1 <= n_tok <= 1048560, n_embd a multiple of 128 up to 8192, aligned rows, "
                       "n_iter >= 1, and with post its f, old streams and hc");
    if (xq && (!xq->qs || !xq->d || (uintptr_t)xq->d % 4 || n_embd % 32))
        return invalid("hc_pre: the Q8_0 copy of x needs its qs and d planes and n_embd a multiple of 32");
    const ds4_cuda_hc_post_in up = post ? *post : ds4_cuda_hc_post_in{};
    const ds4_cuda_q8_out q8 = xq ? *xq : ds4_cuda_q8_out{};
    if (const int c = cluster_blocks(n_tok, n_embd, n_mix, fn_type))
        return launch_cluster(dim3(c), hc_pre_cluster_kernel, dim3(c, n_tok), dim3(kClThreads), 0, s, x, hc, X,
                              x_stride, up, (const __half*)fn, scale, base, n_embd, n_iter, hc_eps, rms_eps, norm_w,
                              defer, q8);
    const int n_parts = (int)(kHc * n_embd / kMixCols);
    cudaError_t e = launch(hc_mix_kernel, dim3(n_parts, (unsigned)ceil_div(n_tok, kMixTok)), dim3(kMixThreads), 0, s,
                           scratch, X, x_stride, up, fn, fn_type, n_mix, n_embd, n_tok);
    if (e == cudaSuccess)
        e = launch(hc_finish_kernel, dim3(n_tok), dim3(kHcThreads + 32), 0, s, x, hc, (const float*)scratch, X,
                   x_stride, scale, base, n_embd, n_mix, n_iter, hc_eps, rms_eps, norm_w, defer);
    if (e != cudaSuccess || !xq) return e;
    return ds4_cuda_quantize_act(s, q8.qs, q8.d, nullptr, x, n_embd, n_tok, n_embd, 32);
}

cudaError_t ds4_cuda_hc_sinkhorn(cudaStream_t s, float* hc, int n_tok, int n_iter, float hc_eps) {
    clear_error();
    if (n_tok < 1 || n_iter < 1 || !hc) return invalid("hc_sinkhorn: needs n_tok >= 1, n_iter >= 1 and hc");
    return launch(hc_sinkhorn_kernel, dim3((unsigned)ceil_div(n_tok, 32)), dim3(32), 0, s, hc, n_tok, n_iter, hc_eps);
}

cudaError_t ds4_cuda_hc_post(cudaStream_t s, float* X_out, const float* f, const float* X, const float* hc,
                             int n_tok, int64_t n_embd) {
    clear_error();
    if (n_tok < 1 || n_embd < 1) return invalid("hc_post: empty");
    const int64_t n = n_tok * n_embd;
    return launch(hc_post_kernel, dim3((unsigned)ceil_div(n, 256)), dim3(256), 0, s, X_out, f, X, hc, n_tok, n_embd);
}

size_t ds4_cuda_hc_pre_scratch_bytes(int n_tok, int64_t n_embd, int n_mix) {
    return (size_t)n_tok * (n_mix + 1) * part_stride((int)ceil_div(kHc * n_embd, kMixCols)) * sizeof(float);
}
