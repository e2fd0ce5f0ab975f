// Token-level ops at the ends of a decode step and around the MoE: the router's expert choice (MODEL.md 3.4 steps
// 2-4), the embedding lookup into the hyper-connection streams, and sampling the next token (MODEL.md 7).
//
// route: one warp per token (routing.cuh, which the decode MoE's gate+up kernel also runs for itself).

#include "routing.cuh"

namespace ds4::cuda {
namespace {

constexpr int kRouteWarps = 4;  // tokens per block

__global__ void route_kernel(int32_t* ids, float* weights, RouteIn r, int n_tok) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x * kRouteWarps + (threadIdx.x >> 5);
    if (t < n_tok) route_token(r, t, ids + (int64_t)t * r.n_used, weights + (int64_t)t * r.n_used);
}

__global__ void embed_kernel(float* X, const void* table, int type, int32_t* tokens, int64_t n_embd, int n_hc,
                             const int32_t* follow, const int64_t* prev) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.y;
    const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int token;
    if (follow && follow[t] >= 0) {
        token = max(0, ((const int32_t*)*prev)[follow[t]]);
        if (blockIdx.x == 0 && threadIdx.x == 0) tokens[t] = token;  // the other blocks read prev, not this
    } else {
        token = tokens[t];
    }
    if (e >= n_embd) return;
    const int64_t at = (int64_t)token * n_embd + e;
    float v;
    if (type == ds4::TYPE_F32) v = ((const float*)table)[at];
    else if (type == ds4::TYPE_F16) v = __half2float(((const __half*)table)[at]);
    else v = __bfloat162float(((const __nv_bfloat16*)table)[at]);
    for (int i = 0; i < n_hc; ++i) X[((int64_t)t * n_hc + i) * n_embd + e] = v;
}

// ---- sampling (MODEL.md 7; daemon/ds4d/sampling.py is the reference) ----------------------------------------
//
// One block of 1024 threads per row. Each pass reads the row (from L2: the head just wrote it):
//   1. the largest logit (lowest index on ties), and whether any logit is not finite (then the host decides);
//      without top-k and top-p (the default knobs) the draw then runs in index order (draw_in_index_order);
//   2. with top-k, the k-th largest value by radix select (common.cuh) over the logits' order-preserving keys,
//      and how many of the values equal to it the pool takes (the lowest indices, as the host's top-k);
//   3. per warp (each owns a contiguous range of indices) the count of candidates: pool members not under the
//      min-p floor; with top-p also the pool's total weight;
//   4. the candidates compacted into shared memory in index order (ballots keep the order), at most kSampleCap
//      of them (more, possible only with top-p and no top-k: the host samples the row);
// then, with top-k or top-p, a bitonic sort by (logit descending, index ascending); weights exp((l - top) / T) in
// float64, their prefix sums, the top-p cut (the first prefix reaching top_p of the pool's weight) and the draw
// (the first prefix reaching u times the kept weight). Only the order of the float64 sums differs from the host.
//
// On sm_90 a row is a thread block cluster of kSampleCluster blocks: each takes a slice of the row for pass 1 (the
// blocks' best logits meet through distributed shared memory) and, without top-k and top-p, a slice of the warps'
// ranges for the draw in index order (each block reads the cluster's per-warp sums and runs the same prefix); with
// top-k or top-p block 0 goes on alone over the whole row. With the random model's flat logits the draw weighs
// every one of 129,280 logits in float64 (92 us on one block).
constexpr int kSampleThreads = 1024, kSampleWarps = kSampleThreads / 32, kSampleCap = 4096;
constexpr int kSampleCluster = 8;
constexpr int kSamplePer = kSampleCap / kSampleThreads;  // entries per thread in the prefix sums
constexpr int kSampleBatch = 8;                          // loads in flight per thread in the passes over a row

// Is (v, i) ahead of (w, j): larger value, or equal value and lower index.
__device__ __forceinline__ bool ahead(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// The warp's best (value, index) of its lanes' candidates, in every lane.
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ahead(ov, oi, v, i)) v = ov, i = oi;
    }
}

// Block-wide best (value, index) over the threads' candidates; every thread gets the result.
__device__ __forceinline__ int block_best(float v, int i, float* sv, int* si) {
    warp_best(v, i);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sv[warp] = v, si[warp] = i;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
        i = lane < (int)(blockDim.x >> 5) ? si[lane] : 0x7fffffff;
        warp_best(v, i);
        if (lane == 0) si[32] = i;
    }
    __syncthreads();
    const int best = si[32];
    __syncthreads();  // before a next call overwrites si
    return best;
}

// l[j] = x[e0 + j * step] below `end` (else -inf, which callers exclude by index): the loads of a batch in flight
// together, since every pass is bound by their latency.
__device__ __forceinline__ void load_batch(float (&l)[kSampleBatch], const float* x, int e0, int step, int end) {
#pragma unroll
    for (int j = 0; j < kSampleBatch; ++j) l[j] = e0 + j * step < end ? x[e0 + j * step] : -INFINITY;
}

// The weight of a warp's candidates in [lo, hi), in every lane.
__device__ __forceinline__ double warp_weight(const float* xr, int lo, int hi, float top, double temp, float floor) {
    const int lane = threadIdx.x & 31;
    double w = 0.0;
    for (int e0 = lo + lane; e0 < hi; e0 += kSampleBatch * 32) {
        float l[kSampleBatch];
        load_batch(l, xr, e0, 32, hi);
#pragma unroll
        for (int j = 0; j < kSampleBatch; ++j)
            if (e0 + j * 32 < hi && l[j] >= floor) w += exp(((double)l[j] - top) / temp);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    return w;
}

// Warp 0: the prefixes of the n_w warps' weights in sd (in place) and the warp whose prefix first reaches u times
// the total (one with weight of its own: its prefix above the one before), into pick[0]; -1 where none has. Lane l
// adds up its n_w / 32 consecutive weights in order, and each lane's offset is the lanes' totals before it added in
// lane order, so the prefixes never decrease and a lane's last prefix is the next lane's offset bit for bit (a
// warp without weight keeps the prefix before it, as one thread's in-order sum would).
constexpr int kCrossPer = kSampleCluster * kSampleWarps / 32;  // weights per lane at most
__device__ __forceinline__ void crossing_warp(double* sd, int n_w, double u, int* pick) {
    const int lane = threadIdx.x & 31, per = n_w / 32, i0 = lane * per;  // n_w: a multiple of 32
    double p[kCrossPer], run = 0.0;
#pragma unroll
    for (int k = 0; k < kCrossPer; ++k) {
        if (k < per) run += sd[i0 + k];
        p[k] = run;
    }
    double off = 0.0;
    for (int l = 0; l < 31; ++l) {
        const double t = __shfl_sync(0xffffffffu, run, l);
        if (l < lane) off += t;
    }
    const double target = u * __shfl_sync(0xffffffffu, off + run, 31);
    int first = -1, last = -1;
    double prev = off;
#pragma unroll
    for (int k = 0; k < kCrossPer; ++k) {
        if (k >= per) break;
        const double at = off + p[k];
        sd[i0 + k] = at;
        if (at > prev) {
            last = i0 + k;
            if (first < 0 && at >= target) first = i0 + k;
        }
        prev = at;
    }
    const uint32_t hit = __ballot_sync(0xffffffffu, first >= 0), any = __ballot_sync(0xffffffffu, last >= 0);
    const int at = hit ? __shfl_sync(0xffffffffu, first, __ffs(hit) - 1)
                 : any ? __shfl_sync(0xffffffffu, last, 31 - __clz(any)) : -1;
    if (lane == 0) pick[0] = at;
}

// The crossing warp (at, of n_w) walks its range [lo, hi) again, 32 logits at a time, from the prefix before it
// (sd as crossing_warp left it): the token whose prefix first reaches u times the total.
__device__ __forceinline__ int walk_warp(const float* xr, int lo, int hi, float top, double temp, float floor,
                                         double u, const double* sd, int n_w, int at) {
    const int lane = threadIdx.x & 31;
    const double target = u * sd[n_w - 1];
    double run = at ? sd[at - 1] : 0.0;
    int last = -1;
    for (int e0 = lo + lane; e0 - lane < hi; e0 += kSampleBatch * 32) {
        float l[kSampleBatch];
        load_batch(l, xr, e0, 32, hi);
#pragma unroll
        for (int j = 0; j < kSampleBatch; ++j) {
            const int e = e0 + j * 32;
            const bool in = e < hi && l[j] >= floor;
            const uint32_t any = __ballot_sync(0xffffffffu, in);
            if (!any) continue;
            const double v = warp_inclusive(in ? exp(((double)l[j] - top) / temp) : 0.0);
            const uint32_t hit = __ballot_sync(0xffffffffu, in && run + v >= target);
            if (hit) return __shfl_sync(0xffffffffu, e, __ffs(hit) - 1);
            last = __shfl_sync(0xffffffffu, e, 31 - __clz(any));
            run += __shfl_sync(0xffffffffu, v, 31);
        }
    }
    return last;  // the prefixes' rounding left the target past this warp's own sums: its last candidate
}

// Without top-k or top-p the candidates stay in index order, so nothing is compacted and any number of them is
// fine: the C x 32 warps of the row's blocks (a cluster when C > 1; this one is `rank`) each sum the weights of
// their range's candidates, every block gathers the sums in order (sall, from the cluster's shared memory), its
// warp 0 runs the prefix over the warps, and the first warp whose prefix reaches the target walks its range
// again, 32 logits at a time. Returns the token in that warp (in every lane), -1 elsewhere.
template <int C>
__device__ __forceinline__ int draw_in_index_order(const float* xr, int n, int rank, float top, double temp,
                                                   float floor, double u, double* sd, double* sall, int* pick) {
    constexpr int n_w = C * kSampleWarps;
    const int warp = threadIdx.x >> 5, me = rank * kSampleWarps + warp;
    const int per = (int)ceil_div(ceil_div(n, n_w), 32) * 32;
    const int lo = min(n, me * per), hi = min(n, lo + per);
    const double w = warp_weight(xr, lo, hi, top, temp, floor);
    if ((threadIdx.x & 31) == 0) sd[warp] = w;
    double* sums = sd;
    if constexpr (C > 1) {
        cluster_sync();
        for (int t = threadIdx.x; t < n_w; t += blockDim.x)
            sall[t] = *cluster_at(&sd[t % kSampleWarps], t / kSampleWarps);
        cluster_sync();  // every block has read the others' sums (each may return from here)
        sums = sall;
    } else {
        __syncthreads();
    }
    if (threadIdx.x < 32) crossing_warp(sums, n_w, u, pick);
    __syncthreads();
    const int at = pick[0];
    if (at != me) return -1;
    return walk_warp(xr, lo, hi, top, temp, floor, u, sums, n_w, at);
}

// Where a row's id goes: the device's array, and pinned host memory when `host` is set.
struct IdsOut {
    int32_t* dev;
    int32_t* host;
    __device__ __forceinline__ void put(int row, int id) const {
        dev[row] = id;
        if (host) host[row] = id;
    }
};

// C blocks per row (a cluster of C consecutive blocks when C > 1).
template <int C>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(IdsOut ids, const ds4_cuda_draw* draws,
                                                                const float* x, int64_t x_stride, int n) {
    __shared__ float cl[kSampleCap];
    __shared__ int ci[kSampleCap];
    __shared__ uint32_t hist[512];
    __shared__ float sv[32];
    __shared__ int si[33];
    __shared__ int sn[kSampleWarps];
    __shared__ double sd[kSampleWarps];
    __shared__ int pick[4];  // radix_select's digits and counts; then the top-p cut and the draw (or its warp);
                             // C > 1: pick[3] first carries the cluster's non-finite flag
    __shared__ double sall[C > 1 ? C * kSampleWarps : 1];  // C > 1: the cluster's per-warp weights, in order
    __shared__ float cv;                                    // C > 1: this block's best logit, its index, bad
    __shared__ int ci_best, c_bad;
    pdl_trigger();
    pdl_wait();
    const int row = blockIdx.x / C, rank = blockIdx.x % C, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const ds4_cuda_draw d = draws[row];
    const float* xr = x + row * x_stride;
    if (d.mode == DS4_DRAW_SKIP) {
        if (tid == 0 && rank == 0) ids.put(row, -1);
        return;
    }
    // 1. the top logit (C > 1: of this block's slice, then of the cluster's)
    const int chunk = (int)ceil_div(n, C), lo1 = min(n, rank * chunk), hi1 = min(n, lo1 + chunk);
    float v = -INFINITY;
    int i = 0x7fffffff, bad = 0;
    for (int e0 = lo1 + tid; e0 < hi1; e0 += kSampleBatch * kSampleThreads) {
        float l[kSampleBatch];
        load_batch(l, xr, e0, kSampleThreads, hi1);
#pragma unroll
        for (int j = 0; j < kSampleBatch; ++j) {
            const int e = e0 + j * kSampleThreads;
            if (e < hi1 && !isfinite(l[j])) bad = 1;
            else if (e < hi1 && ahead(l[j], e, v, i)) v = l[j], i = e;
        }
    }
    bad = __syncthreads_or(bad);
    int best = block_best(v, i, sv, si);
    if constexpr (C > 1) {
        if (tid == 0) cv = best < n ? xr[best] : -INFINITY, ci_best = best, c_bad = bad;
        cluster_sync();
        if (warp == 0) {
            float bv = -INFINITY;
            int bi = 0x7fffffff, bb = 0;
            if (lane < C) bv = *cluster_at(&cv, lane), bi = *cluster_at(&ci_best, lane), bb = *cluster_at(&c_bad, lane);
            warp_best(bv, bi);
            bb = __any_sync(0xffffffffu, bb);
            if (lane == 0) si[32] = bi, pick[3] = bb;
        }
        cluster_sync();  // the reads of the other blocks' shared memory are done (and si, pick are visible)
        best = si[32], bad = pick[3];
    }
    if (bad || d.mode == DS4_DRAW_GREEDY) {
        if (tid == 0 && rank == 0) ids.put(row, bad ? -1 : best);
        return;
    }
    const float top = xr[best];
    const double temp = d.temperature;
    const float floor = __double2float_rn((double)top + d.t_log_min_p);  // the host compares in float32 as well
    if (d.top_k == 0 && d.top_p >= 1.0) {
        const int token = draw_in_index_order<C>(xr, n, rank, top, temp, floor, d.u, sd, sall, pick);
        if (token >= 0 && lane == 0) ids.put(row, token);
        return;
    }
    if (rank != 0) return;  // top-k or top-p: block 0 alone over the whole row
    const int per = (int)ceil_div(ceil_div(n, kSampleWarps), 32) * 32;     // each warp's range of indices
    const int lo = min(n, warp * per), hi = min(n, lo + per);
    // 2. top-k: the k-th largest key, and `need`, how many of the keys equal to it are in the pool
    const int k = min(d.top_k, n);
    uint32_t kth = 0;
    int need = 0;
    if (k > 0) kth = radix_select([&](int i) { return order_key(xr[i]); }, n, k, hist, pick, &need);
    const bool ties_in = k > 0 && order_key(floor) <= kth;  // the pool's ties at the k-th value pass the floor
    // 3. per warp: candidates other than ties at the k-th value, those ties, and the pool's weight
    int cand = 0, ties = 0;
    double mass = 0.0;
    for (int e0 = lo + lane; e0 < hi; e0 += kSampleBatch * 32) {
        float l[kSampleBatch];
        load_batch(l, xr, e0, 32, hi);
#pragma unroll
        for (int j = 0; j < kSampleBatch; ++j) {
            if (d.top_p >= 1.0 && !(l[j] >= floor)) continue;  // neither a candidate nor a tie that counts
            const uint32_t key = order_key(l[j]);
            const bool real = e0 + j * 32 < hi, above = real && (k == 0 || key > kth);
            cand += above && l[j] >= floor;
            ties += real && k > 0 && key == kth;
            if (d.top_p < 1.0 && above) mass += exp(((double)l[j] - top) / temp);
        }
    }
    cand = __reduce_add_sync(0xffffffffu, cand);
    ties = __reduce_add_sync(0xffffffffu, ties);
    if (d.top_p < 1.0) {
        if (k > 0 && tid == 0) mass += need * exp(((double)key_float(kth) - top) / temp);
        double pool;
        block_exclusive(mass, sd, &pool);
        mass = pool;
    }
    int n_ties;
    const int tie_base = block_exclusive(lane == 0 ? ties : 0, sn, &n_ties);
    const int tie_base_w = __shfl_sync(0xffffffffu, tie_base, 0);
    const int mine = cand + (ties_in ? max(0, min(ties, need - tie_base_w)) : 0);
    int m;
    int at = __shfl_sync(0xffffffffu, block_exclusive(lane == 0 ? mine : 0, sn, &m), 0);
    if (m > kSampleCap) {
        if (tid == 0) ids.put(row, -1);
        return;
    }
    // 4. compaction in index order
    int tie_at = tie_base_w;
    const uint32_t lt = (1u << lane) - 1;
    for (int e0 = lo + lane; e0 - lane < hi; e0 += kSampleBatch * 32) {
        float l[kSampleBatch];
        load_batch(l, xr, e0, 32, hi);
#pragma unroll
        for (int j = 0; j < kSampleBatch; ++j) {
            // Every candidate is at or above the floor (ties at the k-th value count only when it is): most
            // groups of 32 have none.
            if (!__any_sync(0xffffffffu, l[j] >= floor)) continue;
            const int e = e0 + j * 32;
            const uint32_t key = order_key(l[j]);
            const bool tie = e < hi && k > 0 && key == kth;
            const uint32_t tb = __ballot_sync(0xffffffffu, tie);
            const bool in = e < hi && (tie ? ties_in && tie_at + __popc(tb & lt) < need
                                           : (k == 0 || key > kth) && l[j] >= floor);
            const uint32_t ib = __ballot_sync(0xffffffffu, in);
            if (in) cl[at + __popc(ib & lt)] = l[j], ci[at + __popc(ib & lt)] = e;
            tie_at += __popc(tb);
            at += __popc(ib);
        }
    }
    __syncthreads();
    // sorted order with top-k or top-p: bitonic over the next power of two, padded with entries behind all others
    if (k > 0 || d.top_p < 1.0) {
        int p2 = 1;
        while (p2 < m) p2 <<= 1;
        for (int j = m + tid; j < p2; j += kSampleThreads) cl[j] = -INFINITY, ci[j] = 0x7fffffff;
        __syncthreads();
        for (int size = 2; size <= p2; size <<= 1)
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int t = tid; t < p2 / 2; t += kSampleThreads) {
                    const int a = 2 * t - (t & (stride - 1)), b = a + stride;
                    const bool first = ahead(cl[a], ci[a], cl[b], ci[b]);
                    if (first != ((a & size) == 0)) {
                        const float fl = cl[a];
                        const int fi = ci[a];
                        cl[a] = cl[b], ci[a] = ci[b], cl[b] = fl, ci[b] = fi;
                    }
                }
                __syncthreads();
            }
    }
    // prefix sums of the weights: thread t owns entries kSamplePer * t ...
    double c[kSamplePer], run = 0.0;
#pragma unroll
    for (int j = 0; j < kSamplePer; ++j) {
        const int e = kSamplePer * tid + j;
        run += e < m ? exp(((double)cl[e] - top) / temp) : 0.0;
        c[j] = run;
    }
    double total;
    const double base = block_exclusive(run, sd, &total);
#pragma unroll
    for (int j = 0; j < kSamplePer; ++j) c[j] += base;
    // the top-p cut: the first prefix reaching top_p of the pool's weight keeps entries up to it
    if (tid == 0) pick[1] = m - 1, pick[2] = 0x7fffffff;
    __syncthreads();
    if (d.top_p < 1.0) {
        const double want = d.top_p * mass;
#pragma unroll
        for (int j = 0; j < kSamplePer; ++j)
            if (kSamplePer * tid + j < m && c[j] >= want) atomicMin(&pick[1], kSamplePer * tid + j);
        __syncthreads();
    }
    const int last = pick[1];
    if (last / kSamplePer == tid) sd[0] = c[last % kSamplePer];
    __syncthreads();
    const double target = d.u * sd[0];
#pragma unroll
    for (int j = 0; j < kSamplePer; ++j)
        if (kSamplePer * tid + j <= last && c[j] >= target) atomicMin(&pick[2], kSamplePer * tid + j);
    __syncthreads();
    if (tid == 0) ids.put(row, ci[min(pick[2], last)]);
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_route(cudaStream_t s, int32_t* ids, float* weights, const float* logits, const float* bias,
                           const int32_t* tid2eid, const int32_t* tokens, int n_tok, int n_expert, int n_used,
                           float scale, bool normalize) {
    clear_error();
    if (n_tok < 1 || n_expert < 1 || n_expert > kRouteMaxExperts || n_used < 1 || n_used > kRouteMaxUsed ||
        n_used > n_expert || (tid2eid && !tokens))
        return invalid("route: needs 1 <= n_used <= min(16, n_expert), n_expert <= 256, tokens with tid2eid");
    const RouteIn r{logits, bias, tid2eid, tokens, n_expert, n_used, scale, normalize};
    return launch(route_kernel, dim3((unsigned)ceil_div(n_tok, kRouteWarps)), dim3(32 * kRouteWarps), 0, s, ids,
                  weights, r, n_tok);
}

cudaError_t ds4_cuda_embed(cudaStream_t s, float* X, const void* table, int type, int32_t* tokens, int n_tok,
                           int64_t n_embd, int n_hc, const int32_t* follow, const int64_t* prev) {
    clear_error();
    if (type != ds4::TYPE_F32 && type != ds4::TYPE_F16 && type != ds4::TYPE_BF16)
        return invalid("embed: the table must be F32, F16 or BF16");
    if (n_tok < 1 || n_tok > 65535 || n_embd < 1 || n_hc < 1) return invalid("embed: empty");
    if (follow && !prev) return invalid("embed: follow needs prev");
    return launch(embed_kernel, dim3((unsigned)ceil_div(n_embd, 256), n_tok), dim3(256), 0, s, X, table, type, tokens,
                  n_embd, n_hc, follow, prev);
}

cudaError_t ds4_cuda_sample(cudaStream_t s, int32_t* ids, const ds4_cuda_draw* draws, const float* x,
                            int64_t x_stride, int n_rows, int n, int32_t* ids_host) {
    clear_error();
    if (n_rows < 1 || n_rows > 65535 || n < 1 || x_stride < n) return invalid("sample: empty rows");
    const IdsOut out{ids, ids_host};
    if (props().cc < 90)
        return launch(sample_kernel<1>, dim3(n_rows), dim3(kSampleThreads), 0, s, out, draws, x, x_stride, n);
    return launch_cluster(dim3(kSampleCluster), sample_kernel<kSampleCluster>, dim3(n_rows * kSampleCluster),
                          dim3(kSampleThreads), 0, s, out, draws, x, x_stride, n);
}
