// Token-level ops at the ends of a decode step and around the MoE: the router's expert choice (MODEL.md 3.4 steps
// 2-4), the embedding lookup into the hyper-connection streams, and greedy sampling (argmax).
//
// route: one block per token. Scores p = sqrt(softplus(logit)) in shared memory; then n_used rounds of a block
// argmax of p + bias over the experts not yet taken, ordered by (value, lower index) so ties go to the lower
// index as in ds4; the weights are the unbiased scores, normalized, times the scale. (One warp per token, with
// the scores in registers, measured 2.3x slower: each lane's 32 softplus run in series.)
#include "common.cuh"

namespace ds4::cuda {
namespace {

constexpr int kRouteThreads = 256;

__device__ __forceinline__ float softplus(float z) {
    return z > 20.0f ? z : (z < -20.0f ? expf(z) : log1pf(expf(z)));
}

// Is (v, i) ahead of (w, j): larger value, or equal value and lower index.
__device__ __forceinline__ bool ahead(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// Block-wide best (value, index) over the threads' candidates; every thread gets the result.
__device__ __forceinline__ int block_best(float v, int i, float* sv, int* si) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ahead(ov, oi, v, i)) v = ov, i = oi;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sv[warp] = v, si[warp] = i;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
        i = lane < (int)(blockDim.x >> 5) ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (ahead(ov, oi, v, i)) v = ov, i = oi;
        }
        if (lane == 0) si[32] = i;
    }
    __syncthreads();
    const int best = si[32];
    __syncthreads();  // si is reused by the next round
    return best;
}

__global__ void route_kernel(int32_t* ids, float* weights, const float* logits, const float* bias,
                             const int32_t* tid2eid, const int32_t* tokens, int n_expert, int n_used, float scale,
                             bool normalize) {
    __shared__ float p[1024], key[1024], sv[32];
    __shared__ int si[33];
    __shared__ int chosen[16];
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) {
        p[e] = sqrtf(softplus(logits[(int64_t)t * n_expert + e]));
        key[e] = p[e] + (bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    for (int k = 0; k < n_used; ++k) {
        int id;
        if (tid2eid) {
            id = tid2eid[(int64_t)tokens[t] * n_used + k];
        } else {
            float v = -INFINITY;
            int i = 0x7fffffff;
            for (int e = threadIdx.x; e < n_expert; e += blockDim.x)
                if (key[e] != -INFINITY && ahead(key[e], e, v, i)) v = key[e], i = e;
            id = block_best(v, i, sv, si);
            if (threadIdx.x == 0) key[id] = -INFINITY;
            __syncthreads();
        }
        if (threadIdx.x == 0) chosen[k] = id;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int k = 0; k < n_used; ++k) sum += p[chosen[k]];
        const float div = normalize ? fmaxf(sum, 6.103515625e-5f) : 1.0f;  // ds4's floor, 2^-14
        for (int k = 0; k < n_used; ++k) {
            ids[(int64_t)t * n_used + k] = chosen[k];
            weights[(int64_t)t * n_used + k] = p[chosen[k]] / div * scale;
        }
    }
}

__global__ void embed_kernel(float* X, const void* table, int type, const int32_t* tokens, int64_t n_embd, int n_hc) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.y;
    const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_embd) return;
    const int64_t at = (int64_t)tokens[t] * n_embd + e;
    float v;
    if (type == ds4::TYPE_F32) v = ((const float*)table)[at];
    else if (type == ds4::TYPE_F16) v = __half2float(((const __half*)table)[at]);
    else v = __bfloat162float(((const __nv_bfloat16*)table)[at]);
    for (int i = 0; i < n_hc; ++i) X[((int64_t)t * n_hc + i) * n_embd + e] = v;
}

// argmax in two steps: kArgBlocks blocks per row each take a slice (8 loads in flight per thread) and leave
// their best (value, index) in scratch; one warp per row picks the best of those.
constexpr int kArgBlocks = 32, kArgThreads = 512, kArgBatch = 8;

__global__ void __launch_bounds__(kArgThreads) argmax_partial_kernel(float2* part, const float* x, int64_t x_stride,
                                                                     int64_t n) {
    __shared__ float sv[32];
    __shared__ int si[33];
    pdl_trigger();
    pdl_wait();
    const float* xt = x + blockIdx.y * x_stride;
    const int64_t per = ceil_div(n, gridDim.x), lo = blockIdx.x * per, hi = min(n, lo + per);
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int64_t b = lo + threadIdx.x; b < hi; b += (int64_t)kArgBatch * blockDim.x) {
        float u[kArgBatch];
#pragma unroll
        for (int k = 0; k < kArgBatch; ++k) {
            const int64_t e = b + (int64_t)k * blockDim.x;
            u[k] = e < hi ? xt[e] : -INFINITY;
        }
#pragma unroll
        for (int k = 0; k < kArgBatch; ++k) {
            const int e = (int)(b + (int64_t)k * blockDim.x);
            if (e < hi && ahead(u[k], e, v, i)) v = u[k], i = e;
        }
    }
    const int best = block_best(v, i, sv, si);
    if (threadIdx.x == 0) {
        const float bv = best == 0x7fffffff ? -INFINITY : xt[best];
        part[blockIdx.y * gridDim.x + blockIdx.x] = make_float2(bv, __int_as_float(best));
    }
}

__global__ void argmax_final_kernel(int32_t* ids, const float2* part, int nb) {
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x;
    float v = -INFINITY;
    int i = 0x7fffffff;
    if (lane < nb) {
        const float2 p = part[blockIdx.x * nb + lane];
        v = p.x, i = __float_as_int(p.y);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ahead(ov, oi, v, i)) v = ov, i = oi;
    }
    if (lane == 0) ids[blockIdx.x] = i == 0x7fffffff ? 0 : i;
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_route(cudaStream_t s, int32_t* ids, float* weights, const float* logits, const float* bias,
                           const int32_t* tid2eid, const int32_t* tokens, int n_tok, int n_expert, int n_used,
                           float scale, bool normalize) {
    clear_error();
    if (n_tok < 1 || n_expert < 1 || n_expert > 1024 || n_used < 1 || n_used > 16 || n_used > n_expert ||
        (tid2eid && !tokens))
        return invalid("route: needs 1 <= n_used <= min(16, n_expert), n_expert <= 1024, tokens with tid2eid");
    return launch(route_kernel, dim3(n_tok), dim3(kRouteThreads), 0, s, ids, weights, logits, bias, tid2eid, tokens,
                  n_expert, n_used, scale, normalize);
}

cudaError_t ds4_cuda_embed(cudaStream_t s, float* X, const void* table, int type, const int32_t* tokens, int n_tok,
                           int64_t n_embd, int n_hc) {
    clear_error();
    if (type != ds4::TYPE_F32 && type != ds4::TYPE_F16 && type != ds4::TYPE_BF16)
        return invalid("embed: the table must be F32, F16 or BF16");
    if (n_tok < 1 || n_tok > 65535 || n_embd < 1 || n_hc < 1) return invalid("embed: empty");
    return launch(embed_kernel, dim3((unsigned)ceil_div(n_embd, 256), n_tok), dim3(256), 0, s, X, table, type, tokens,
                  n_embd, n_hc);
}

size_t ds4_cuda_argmax_scratch_bytes(int n_tok) { return (size_t)n_tok * kArgBlocks * sizeof(float2); }

cudaError_t ds4_cuda_argmax(cudaStream_t s, int32_t* ids, void* scratch, const float* x, int64_t x_stride, int n_tok,
                            int64_t n) {
    clear_error();
    if (n_tok < 1 || n_tok > 65535 || n < 1 || n > 0x7ffffffe || !scratch)
        return invalid("argmax: empty, or no scratch");
    cudaError_t e = launch(argmax_partial_kernel, dim3(kArgBlocks, n_tok), dim3(kArgThreads), 0, s, (float2*)scratch,
                           x, x_stride, n);
    if (e != cudaSuccess) return e;
    return launch(argmax_final_kernel, dim3(n_tok), dim3(32), 0, s, ids, (const float2*)scratch, kArgBlocks);
}
