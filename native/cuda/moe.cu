// Mixture-of-experts kernels for decode: the routed experts of each token, in two launches.
//
// gate_up: block row blockIdx.y is token t; its warps walk the (expert slot j, row o) pairs of that token, each
// warp streaming row o of gate_e and of up_e together (one activation read serves both), and finishes the
// pair itself: mid[t, j, o] = silu(min(g, c)) * clip(u, +-c) * weight[t, j]. down: the warps walk the output rows
// o; for the quantized types one stage holds row o of all n_used experts' down matrices (each against its own
// mid row), so the weighted sum over experts happens in registers, each output is written once (no atomics), and
// a stage is n_used x 0.5-1 KB rather than one short row (Q2_K with all rows of a stage live: by quarters of 64
// weights, qdot.cuh q2k_quarter_dot). Float and Q8_0 experts (small test models) stream the experts' rows one after
// the other instead.
//
// Expert ids and weights are read from device memory (the router's output), so a captured graph replays any
// routing; each block copies its token's into shared memory first. Or gate_up makes the choice itself from the
// router's logits (routing.cuh: warp 0 of every block, for its token), and the token's first block writes it out
// for down: one launch fewer per decode layer than a separate route kernel. gate_up's blocks quantize h_t into
// shared memory themselves; down's n_used mid rows of t are quantized once into the caller's workspace, by a small
// kernel or (one token) by extra blocks of the shared expert's down launch (ds4_cuda_matvec_quantizing, then
// work_filled), and every block copies them (each of ~260 blocks quantizing 6 x 2048 values itself took 8 of the
// kernel's 18 us at one token; quantizing each block of mid in gate_up, by the warp whose store completes it,
// cost more than that launch: a fence per pair drains the warp's weight stages in flight). Tokens do not share
// expert reads: at decode sizes most of a token's experts are its own (8 tokens x 6 of 256).
//
// At one token gate_up also computes the shared expert's gate and up (Q8_0) in the warps other than the routing
// warp, its weights fetched before the dependency wait: a kernel whose blocks fill every SM leaves no room for
// another stream's kernel beside it, so the shared expert could not run beside gate_up on a side stream. Its last
// warp may also normalize the FFN entry's combine matrix (ds4_cuda_hc_pre with defer): no launch, no join.
#include "hc.cuh"
#include "qdot.cuh"
#include "routing.cuh"

namespace ds4::cuda {
namespace {

constexpr int kMaxUsed = 8;

// The experts' copies' L2 priority (both kernels' grid rows are tokens): evict-first in a one-token launch, whose
// experts are each read once; normal in a batch's, whose tokens may share experts (the second reader's L2 hits).
__device__ __forceinline__ uint64_t expert_policy() { return gridDim.y == 1 ? l2_evict_first() : l2_evict_normal(); }

struct MoeArgs {
    float* out;
    int64_t out_stride;
    const float* x;  // gate_up: h (n_tok rows, x_stride apart); down: mid (n_tok, n_used, cols), dense
    int64_t x_stride;
    const uint8_t* w0;  // gate (gate_up) or down
    const uint8_t* w1;  // up (gate_up)
    int64_t rows, cols, row_bytes;  // of one expert's matrix
    FastDiv rows_div;                // / rows
    int n_expert, n_used;
    const int32_t* ids;
    const float* weights;
    float clamp;
    bool accumulate;
    const uint32_t* tab;
    const uint8_t* xq;  // down: the mid rows quantized once (act_bytes(n_used, cols) per token), or null
    RouteIn route;      // gate_up: with route.logits, the choice is made here and written to ids_out / weights_out
    int32_t* ids_out;
    float* weights_out;
    // gate_up with sh_w0: the shared expert's gate and up too (Q8_0, sh_rows rows of cols), by warps 1 .. sh_warps
    // of every block while warp 0 routes (a token's blocks for that token), into sh_out (sh_rows per token: its
    // SwiGLU clamped at sh_clamp, weight 1).
    const uint8_t* sh_w0;
    const uint8_t* sh_w1;
    int sh_rows, sh_row_bytes, sh_warps;
    float sh_clamp;
    float* sh_out;
    // route_gate_up with hc: the combine matrices ds4_cuda_hc_pre left as logits (one token's per lane of the last
    // warp of the last block, after the wait and before the block's barrier: a warp the shared expert leaves idle).
    ds4_cuda_sinkhorn hc;
};

// h (one row of cols values, a multiple of 256) quantized twice in one pass, for the shared expert (Q8_0, at x0)
// and the routed experts of a K type T (Q8_K, at xk, its qs plane by act_place<SWZ>), each exactly as
// quantize_block lays it out: warp `first` of `step` takes the Q8_K blocks first, first + step, ... (8 values a
// lane: q8_k_lane), and lanes 4 m .. 4 m + 3 hold Q8_0 block m's 32 values (their largest |x| in 2 shuffles).
template <int T, int SWZ>
__device__ void quantize_both(uint8_t* x0, uint8_t* xk, const float* h, int64_t cols, int first, int step) {
    const int lane = threadIdx.x & 31;
    const XView v0 = act_view<TYPE_Q8_0>(x0, 1, cols), vk = act_view<T>(xk, 1, cols);
    auto one = [&](int64_t b, const float (&v)[8]) {
        const int64_t col = b * 256 + 8 * lane;
        uint32_t wk[2], w0[2] = {0u, 0u};
        int sum;
        const float dk = q8_k_lane(v, lane, wk, sum);
        float amax = 0.0f, d0;
#pragma unroll
        for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[k]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const float i0 = q8_0_inv(amax, d0);
#pragma unroll
        for (int k = 0; k < 8; ++k) w0[k / 4] |= ((uint32_t)q8_0_value(v[k], i0) & 255u) << (8 * (k % 4));
        *(uint2*)(vk.qs + act_place<SWZ>(col)) = make_uint2(wk[0], wk[1]);
        *(uint2*)(v0.qs + act_swz(col)) = make_uint2(w0[0], w0[1]);
        if (lane == 0) ((float*)vk.d)[b] = dk;
        if ((lane & 3) == 0) ((float*)v0.d)[col / 32] = d0;
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        if ((lane & 1) == 0) ((int16_t*)vk.bs)[b * 16 + lane / 2] = (int16_t)sum;
    };
    // Two blocks a pass, both blocks' loads first (DS4's 16 blocks over 11 warps: one trip to L2 instead of two).
    const int64_t nb = cols / 256;
    for (int64_t b = first; b < nb; b += 2 * step) {
        const bool two = b + step < nb;
        float v[2][8];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (i == 1 && !two) break;
            const float* p = h + (b + i * step) * 256 + 8 * lane;
            const float4 f0 = *(const float4*)p, f1 = *(const float4*)(p + 4);
            v[i][0] = f0.x, v[i][1] = f0.y, v[i][2] = f0.z, v[i][3] = f0.w;
            v[i][4] = f1.x, v[i][5] = f1.y, v[i][6] = f1.z, v[i][7] = f1.w;
        }
        one(b, v[0]);
        if (two) one(b + step, v[1]);
    }
}

// The shared expert's stages inside gate_up: 2048 weights of its gate row and of its up row, one stage per warp
// at a time in the space of the routed rows' ring (free until the routing is known).
using ShStage = Stage<TYPE_Q8_0, 2>;
// The choice from the router's logits in gate_up: each expert's score and key (routing.cuh route_scores) in the last
// kScoreBytes of the routed rows' ring, past the shared expert's stages.
constexpr size_t kScoreBytes = kRouteMaxExperts * (sizeof(float) + sizeof(uint32_t));

// Stage sizes: gate/up rows (n_embd = 4096 wide) in two stages of 2048 weights for the 2-bit and 4-bit types
// (half the registers of whole-row stages: 3 blocks per SM; Q4_K at 8 tokens 178 -> 129 us, IQ2_XXS at one token
// 25.8 -> 24.2 us on an H200); down stages small enough that n_used rows share one and two blocks fit an SM.
template <int T>
constexpr int gate_up_sps() {
    return WT<T>::xb == 256 ? 2 : WT<T>::sps;
}
// The gate_up block's rings (each warp's kDepth stages of its gate and up rows), after h's forms in shared memory.
template <int T, int WARPS>
constexpr size_t gate_up_ring_bytes() {
    return (size_t)WARPS * kDepth * 2 * Stage<T, gate_up_sps<T>()>::slot;
}
template <int T>
constexpr int down_sps() {
    return WT<T>::xb == 256 ? 1 : WT<T>::sps;  // 1024 weights: n_used rows x 0.3-0.6 KB, two blocks per SM
}
// Rows per stage of the down kernel: all n_used experts at once for the K types, one at a time otherwise.
template <int T>
constexpr bool down_together() {
    return WT<T>::xb == 256;
}

// Copies token t's expert ids (null: slot j is expert j; an id outside [0, n_expert) reads expert 0) and weights
// (null: 1) into shared memory.
__device__ __forceinline__ void load_routing(int* sid, float* swt, const MoeArgs& a, int t) {
    if (threadIdx.x < a.n_used) {
        const int j = threadIdx.x;
        const int e = a.ids ? a.ids[(int64_t)t * a.n_used + j] : j;
        sid[j] = (e < 0 || e >= a.n_expert) ? 0 : e;
        swt[j] = a.weights ? a.weights[(int64_t)t * a.n_used + j] : 1.0f;
    }
}

// With the shared expert, a K type's launch keeps h's Q8_0 form in a space of its own after the rings (both forms
// are written at once, quantize_both).
template <int T, bool LANES, int WARPS>
size_t gate_up_smem(int64_t cols, bool shared) {
    return table_bytes<T, LANES>() + act_bytes<T>(1, cols) + gate_up_ring_bytes<T, WARPS>() +
           (shared && WT<T>::xb == 256 ? act_bytes<TYPE_Q8_0>(1, cols) : 0);
}

// Whether every stage of an expert row is whole and starts 16-byte aligned (row_bytes a multiple of the stage's
// bytes, those a multiple of 16; the weights are 16-byte aligned) and all experts' matrices span under 4 GiB
// (32-bit offsets): the Streamer's FULL case, instantiated for the block types of the real models' experts. (An
// IQ2_XXS down stage of 1024 weights is 264 bytes: not FULL.)
template <int T, int SPS>
bool full_stages(const MoeArgs& a) {
    return WT<T>::xb == 256 && Stage<T, SPS>::bytes % 16 == 0 && a.row_bytes % Stage<T, SPS>::bytes == 0 &&
           (uint64_t)a.n_expert * a.rows * a.row_bytes < (1ull << 32);
}

// LANES: the IQ2_XXS tables in shared memory one copy per lane (qdot.cuh). FULL: full_stages.
template <int T, bool LANES, bool FULL, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, 2) moe_gate_up_kernel(MoeArgs a) {
    constexpr int RPW = 2, SPS = gate_up_sps<T>();
    constexpr int kSwz = iq2_pairs<T, SPS, 1, true, FULL>() ? kSwzQuarters : kSwzUnits;  // h's routed form
    using G = Stage<T, SPS>;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int sid[kMaxUsed];
    __shared__ float swt[kMaxUsed];
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.y;
    uint32_t* tab = LANES ? lanes_tables(smem) : (uint32_t*)smem;
    uint8_t* xs = smem + table_bytes<T, LANES>();
    constexpr size_t kRing = gate_up_ring_bytes<T, WARPS>();
    static_assert(32 * WARPS >= kRouteMaxExperts && kRing >= kScoreBytes, "gate_up: room to score every expert");
    uint8_t* ring = xs + act_bytes<T>(1, a.cols) + (size_t)warp * kDepth * RPW * G::slot;
    float* const sp = (float*)(xs + act_bytes<T>(1, a.cols) + kRing - kScoreBytes);
    uint32_t* const skey = (uint32_t*)(sp + kRouteMaxExperts);

    const int slot = blockIdx.x * WARPS + warp, n_slots = gridDim.x * WARPS;
    const int rows = (int)a.rows, n_pairs = a.n_used * rows, row_bytes = (int)a.row_bytes;
    const int n_sets = slot < n_pairs ? (n_pairs - 1 - slot) / n_slots + 1 : 0;
    const int steps = (int)ceil_div(a.cols, G::weights);

    auto row_of = [&](int set) {  // row set `set` of this warp: row o of expert slot j, matrix row sid[j] rows + o
        const int pair = slot + set * n_slots, j = a.rows_div.div(pair), o = pair - j * rows;
        return sid[j] * rows + o;
    };
    auto plan = [&](int set, int st) {
        Src<RPW> s;
        const int row = row_of(set);
        const size_t at = FULL ? (uint32_t)row * (uint32_t)row_bytes + (uint32_t)(st * G::bytes)  // under 4 GiB
                               : (size_t)row * row_bytes + st * G::bytes;
        s.p[0] = a.w0 + at;
        s.p[1] = a.w1 + at;
        s.len = min(G::bytes, row_bytes - st * G::bytes);
        s.live = RPW;
        s.k0 = st * G::weights;
        s.seg = 0;
        return s;
    };
    auto stream = make_streamer<T, SPS, 1, RPW, true, FULL>(ring, lane, n_sets, steps, plan, expert_policy());

    // The shared expert's pairs (gate row o, up row o): warp w >= 1 of block b takes o = b sh_warps + w - 1, then
    // on by the grid's count of such warps; its first stage's weights are issued before the wait.
    const bool sh = a.sh_w0 && warp >= 1 && warp <= a.sh_warps;
    const int sh_first = blockIdx.x * a.sh_warps + warp - 1, sh_step = gridDim.x * a.sh_warps;
    uint8_t* const sh_slot = xs + act_bytes<T>(1, a.cols) + (size_t)(warp - 1) * 2 * ShStage::slot;
    auto sh_src = [&](int o, int st, int r) {
        return (r ? a.sh_w1 : a.sh_w0) + (size_t)o * a.sh_row_bytes + st * ShStage::bytes;
    };
    auto sh_issue = [&](int o, int st) {
        const int len = min(ShStage::bytes, a.sh_row_bytes - st * ShStage::bytes);
        const uint32_t d = (uint32_t)__cvta_generic_to_shared(sh_slot);
        copy_range<(ShStage::slot / 16 + 31) / 32>(d, sh_src(o, st, 0), len, lane, l2_evict_first());
        copy_range<(ShStage::slot / 16 + 31) / 32>(d + ShStage::slot, sh_src(o, st, 1), len, lane, l2_evict_first());
        cp_async_commit();
    };
    if (sh && sh_first < a.sh_rows) sh_issue(sh_first, 0);
    load_tables<T, LANES>(tab, a.tab);
    pdl_wait();
    // The choice's scores first, an expert per thread of warps 0-7; warp 0 picks from them below. (One warp scoring
    // all 256 in turn, branchy code under the other warps' load, held the routed rows back ~6 us after the wait;
    // spread so: -1.9 us per layer at 2 and 8 tokens, H200.)
    if (a.route.logits) {
        route_scores(a.route, t, sp, skey);
        if (warp > 0 && warp < kRouteMaxExperts / 32) named_arrive(2, kRouteMaxExperts);
    }
    // h quantized for the routed rows by warps 1.. while warp 0 chooses the experts (as a pass after the block's
    // barrier below, it waited behind the choice: ~2.5 us at one token, H200). With the shared expert, its Q8_0 form
    // for it too: for a K type in a space of its own, both forms written in one pass (quantize_both); for Q8_0
    // experts the one form serves both.
    constexpr bool kBoth = WT<T>::xb == 256;
    uint8_t* const x0 = kBoth && a.sh_w0 ? xs + act_bytes<T>(1, a.cols) + kRing : xs;
    if constexpr (WT<T>::xb != 0) {
        if (warp > 0) {
            const float* h = a.x + (int64_t)t * a.x_stride;
            if (kBoth && a.sh_w0) {
                quantize_both<T, kSwz>(x0, xs, h, a.cols, warp - 1, WARPS - 1);
            } else {
                const XView v = act_view<T>(xs, 1, a.cols);
                quantize_rows<WT<T>::xb, kSwz>((int8_t*)v.qs, (float*)v.d, (int16_t*)v.bs, h, a.x_stride, 1, a.cols,
                                               warp - 1, WARPS - 1);
            }
        }
    }
    if (a.sh_w0 && warp > 0) {
        // Then the shared expert's pairs, exactly as the products path computes them (ds4_cuda_matvec and
        // ds4_cuda_swiglu).
        const XView xv = act_view<TYPE_Q8_0>(x0, 1, a.cols);
        named_barrier(1, 32 * (WARPS - 1));
        const int sh_steps = sh ? (int)ceil_div(a.cols, ShStage::weights) : 0;
        for (int o = sh_first; sh && o < a.sh_rows; o += sh_step) {
            float acc[2][1] = {{0.0f}, {0.0f}};
            for (int st = 0; st < sh_steps; ++st) {
                if (o != sh_first || st > 0) sh_issue(o, st);
                cp_async_wait<0>();
                __syncwarp();
                const uint8_t* rp[2] = {sh_slot + ((uintptr_t)sh_src(o, st, 0) & 15),
                                        sh_slot + ShStage::slot + ((uintptr_t)sh_src(o, st, 1) & 15)};
                stage_dot<TYPE_Q8_0, 2, 1, 2, true, false>(rp, 2, lane, (int64_t)st * ShStage::weights, a.cols, &xv, 1,
                                                            acc, nullptr);
                __syncwarp();  // every lane is done with the slot before the next stage refills it
            }
            const float g = warp_sum(acc[0][0]), u = warp_sum(acc[1][0]);
            if (lane == 0) {
                const float gc = fminf(g, a.sh_clamp), uc = fminf(fmaxf(u, -a.sh_clamp), a.sh_clamp);
                a.sh_out[(int64_t)t * a.sh_rows + o] = silu(gc) * uc;
            }
        }
    }
    if (a.hc.hc && warp == WARPS - 1 && blockIdx.x == gridDim.x - 1 && t == 0 && lane < a.hc.n_tok)
        sinkhorn_logits(a.hc.hc + lane * kHcVals, a.hc.n_iter, a.hc.hc_eps);
    if (a.route.logits) {
        if (warp == 0) {
            named_barrier(2, kRouteMaxExperts);
            route_pick_shared(a.route, t, sp, skey, sid, swt);
            __syncwarp();
            if (lane < a.n_used) {
                const int e = sid[lane];
                if (blockIdx.x == 0) {
                    a.ids_out[(int64_t)t * a.n_used + lane] = e;
                    a.weights_out[(int64_t)t * a.n_used + lane] = swt[lane];
                }
                sid[lane] = (e < 0 || e >= a.n_expert) ? 0 : e;
            }
        }
    } else {
        load_routing(sid, swt, a, t);
    }
    __syncthreads();
    stream.prologue();  // after the wait: which rows to read depends on the router's ids

    XView xv{};
    if constexpr (WT<T>::xb != 0) xv = act_view<T>(xs, 1, a.cols);
    else xv.xf = a.x + (int64_t)t * a.x_stride;

    auto xview = [&](int) { return &xv; };
    // A set's gate sum is kept by lane set % 16, its up sum by lane 16 + set % 16; after every 16th set and the
    // last, lanes 0-15 finish their pairs at once (one lane finishing each pair took the warp ~60 issue slots per
    // set, a tenth of the stages' at 8 tokens, where a warp takes ~30 sets).
    float kept = 0.0f;
    auto flush = [&](int set, float (&acc)[RPW][1]) {
        float both[2] = {acc[0][0], acc[1][0]};
        const float v = warp_sums(both);
        if ((lane & 15) == (set & 15)) kept = v;
        if ((set & 15) == 15 || set == n_sets - 1) {
            const float u = __shfl_down_sync(0xffffffffu, kept, 16);
            const int s = (set & ~15) + lane;
            if (lane < 16 && s <= set) {
                const int pair = slot + s * n_slots, j = a.rows_div.div(pair), o = pair - j * rows;
                const float gc = fminf(kept, a.clamp), uc = fminf(fmaxf(u, -a.clamp), a.clamp);
                a.out[((int64_t)t * a.n_used + j) * rows + o] = silu(gc) * uc * swt[j];
            }
        }
    };
    stream.template run<LANES>(a.cols, 1, tab, xview, flush);
}

template <int T, int RPW>
size_t down_smem(int n_used, int64_t cols) {
    return table_bytes<T>() + act_bytes<T>(n_used, cols) +
           (size_t)kWarps * kDepth * RPW * Stage<T, down_sps<T>()>::slot;
}

// FULL: full_stages, and a stage's RPW rows are all live (n_used == RPW).
template <int T, int RPW, bool FULL>
__global__ void __launch_bounds__(kThreads, 2) moe_down_kernel(MoeArgs a) {
    constexpr int SPS = down_sps<T>();
    constexpr bool kTogether = RPW > 1;
    constexpr int kSwz = q2k_quarters<T, SPS, 1, RPW, !kTogether, FULL>() ? kSwzQuarters : kSwzUnits;
    using G = Stage<T, SPS>;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int sid[kMaxUsed];
    __shared__ float swt[kMaxUsed];
    pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.y;
    uint32_t* tab = (uint32_t*)smem;
    uint8_t* xs = smem + table_bytes<T>();
    uint8_t* ring = xs + act_bytes<T>(a.n_used, a.cols) + (size_t)warp * kDepth * RPW * G::slot;

    const int slot = blockIdx.x * kWarps + warp, n_slots = gridDim.x * kWarps;
    const int rows = (int)a.rows, row_bytes = (int)a.row_bytes;
    const int n_sets = slot < rows ? (rows - 1 - slot) / n_slots + 1 : 0;
    const int nchunks = (int)ceil_div(a.cols, G::weights);
    const float* mid = a.x + (int64_t)t * a.n_used * a.cols;

    // With the experts' rows together, each row r of a stage reads expert slot r's matrix: its start is found once
    // the routing is known (ebase), so that a stage's plan adds offsets instead of reloading the ids and forming
    // 64-bit products for every row (a fifth of the loop's instructions).
    const uint8_t* ebase[RPW];
    auto plan = [&](int set, int st) {
        Src<RPW> s;
        const int o = slot + set * n_slots;
        const int j = kTogether ? 0 : st / nchunks, c = kTogether ? st : st - j * nchunks;
        s.len = min(G::bytes, row_bytes - c * G::bytes);
        s.live = FULL ? RPW : kTogether ? a.n_used : 1;
        s.k0 = c * G::weights;
        s.seg = j;
        const size_t at = (uint32_t)o * (uint32_t)row_bytes + (uint32_t)(c * G::bytes);  // one matrix: under 4 GiB
#pragma unroll
        for (int r = 0; r < RPW; ++r)
            s.p[r] = kTogether ? ebase[r] + at : a.w0 + (size_t)sid[j] * rows * row_bytes + at;
        return s;
    };
    auto stream = make_streamer<T, SPS, 1, RPW, !kTogether, FULL>(
        ring, lane, n_sets, kTogether ? nchunks : a.n_used * nchunks, plan, expert_policy());
    load_tables<T>(tab, a.tab);
    pdl_wait();
    load_routing(sid, swt, a, t);
    const bool copy_x = WT<T>::xb != 0 && a.xq;
    if (copy_x) {  // before the weights' first stages, so that they queue behind it
        const size_t n = act_bytes<T>(a.n_used, a.cols);
        copy_act<T, kSwz>(xs, a.xq + t * n, a.n_used, a.cols);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RPW; ++r) ebase[r] = a.w0 + (size_t)sid[min(r, a.n_used - 1)] * rows * row_bytes;
    stream.prologue();
    if (copy_x) cp_async_wait<kDepth - 1>();  // the activations' group, not the stages after it
    else if constexpr (WT<T>::xb != 0) quantize_block<T, kSwz>(xs, mid, a.cols, a.n_used, a.cols);
    __syncthreads();

    // The stage's rows r meet slots seg + r, each slot's mid row as "token 0": views built in registers from
    // pointers into xs (so the compiler reads them with shared-memory loads; views kept in shared memory were
    // pointers it could only dereference as generic ones).
    const XView all = WT<T>::xb != 0 ? act_view<T>(xs, a.n_used, a.cols) : XView{};
    XView rows_at[RPW];
    auto xview = [&](int seg) {
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int j = min(seg + r, a.n_used - 1);  // rows past n_used are never live
            XView v = all;
            if constexpr (WT<T>::xb != 0) {
                v.qs += j * v.qs_tok;
                v.d += j * v.d_tok;
                v.bs += j * v.bs_tok;
            } else {
                v.xf = mid + (int64_t)j * a.cols;
            }
            rows_at[r] = v;
        }
        return (const XView*)rows_at;
    };
    auto flush = [&](int set, float (&acc)[RPW][1]) {
        float v = 0.0f;
#pragma unroll
        for (int r = 0; r < RPW; ++r) v += acc[r][0];  // rows past n_used stayed 0
        v = warp_sum(v);
        if (lane == 0) {
            float* o = a.out + (int64_t)t * a.out_stride + slot + set * n_slots;
            *o = a.accumulate ? *o + v : v;
        }
    };
    stream.run(a.cols, 1, tab, xview, flush);
}

// Warps of a gate_up block that can take the shared expert's pairs: their stages fit the routed rows' ring before
// the scores' space, and h as Q8_0 fits the space of its form for T (the K types' launches then give it a space of
// its own: gate_up_smem). 0: the shared expert cannot be done inside.
template <int T, int WARPS>
constexpr int shared_warps(int64_t cols) {
    constexpr size_t ring = gate_up_ring_bytes<T, WARPS>() - kScoreBytes;
    if (WT<T>::xb == 0 || act_bytes<TYPE_Q8_0>(1, cols) > act_bytes<T>(1, cols)) return 0;
    return (int)std::min<size_t>(WARPS - 1, ring / (2 * ShStage::slot));
}

template <int T, bool LANES, int WARPS = kWarps>
cudaError_t gate_up_launch(cudaStream_t s, MoeArgs a, int n_tok) {
    if (a.sh_w0) a.sh_warps = shared_warps<T, WARPS>(a.cols);  // >= 1: gate_up() checked ds4_cuda_moe_shared_ok
    auto kernel = full_stages<T, gate_up_sps<T>()>(a) ? moe_gate_up_kernel<T, LANES, WT<T>::xb == 256, WARPS>
                                                      : moe_gate_up_kernel<T, LANES, false, WARPS>;
    const size_t smem = gate_up_smem<T, LANES, WARPS>(a.cols, a.sh_w0);
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const int64_t want = ceil_div((int64_t)a.n_used * a.rows, WARPS);
    const int per_tok = std::max(1, resident_blocks(kernel, 32 * WARPS, smem) / n_tok);
    return launch(kernel, dim3((unsigned)std::min<int64_t>(want, per_tok), n_tok), dim3(32 * WARPS), smem, s, a);
}

// IQ2_XXS with a copy of the tables per lane (no bank conflicts on the lookups) in blocks of 12 warps, two per SM
// (registers and shared memory allow no more): 24 warps per SM as the compact tables' three blocks of 8 have, without
// their conflicts. H200, us at 1 / 2 / 8 tokens: 23.5 / 34.7 / 108.6 -> 19.4 / 31.4 / 101.3 (per-lane tables in
// blocks of 8 were slower at one token, 25.5: 16 warps per SM; docs/CUDA_KERNELS.md).
constexpr int kGateUpLaneWarps = 12;
template <int T>
struct GateUpOp {
    static cudaError_t run(cudaStream_t s, const MoeArgs& a, int n_tok) {
        if constexpr (T == TYPE_IQ2_XXS) return gate_up_launch<T, true, kGateUpLaneWarps>(s, a, n_tok);
        else return gate_up_launch<T, false>(s, a, n_tok);
    }
};

template <int T, int RPW>
cudaError_t down_launch(cudaStream_t s, const MoeArgs& a, int n_tok) {
    const bool full = full_stages<T, down_sps<T>()>(a) && (!down_together<T>() || a.n_used == RPW);
    auto kernel = full ? moe_down_kernel<T, RPW, WT<T>::xb == 256> : moe_down_kernel<T, RPW, false>;
    const size_t smem = down_smem<T, RPW>(a.n_used, a.cols);
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const int64_t want = ceil_div(a.rows, kWarps);
    const int per_tok = std::max(1, resident_blocks(kernel, kThreads, smem) / n_tok);
    return launch(kernel, dim3((unsigned)std::min<int64_t>(want, per_tok), n_tok), dim3(kThreads), smem, s, a);
}

// The routed experts' mid rows quantized as ds4_cuda_moe_down's workspace holds them (a group per token).
template <int T>
struct MidQuantOp {
    static cudaError_t run(cudaStream_t s, uint8_t* work, const float* mid, int n_tok, int n_used, int64_t n_ff) {
        if constexpr (WT<T>::xb == 0) return invalid("moe_down_quantize: the experts' type takes float activations");
        else return quantize_groups<T>(s, work, mid, n_used * n_ff, n_ff, n_used, n_ff, n_tok);
    }
};

template <int T>
struct DownOp {
    static cudaError_t run(cudaStream_t s, MoeArgs a, int n_tok, void* work, bool filled) {
        if constexpr (WT<T>::xb != 0) {
            if (work && filled) {
                a.xq = (const uint8_t*)work;
            } else if (work) {
                const cudaError_t e = MidQuantOp<T>::run(s, (uint8_t*)work, a.x, n_tok, a.n_used, a.cols);
                if (e != cudaSuccess) return e;
                a.xq = (const uint8_t*)work;
            }
        }
        if constexpr (down_together<T>()) {
            if (a.n_used <= 1) return down_launch<T, 1>(s, a, n_tok);
            if (a.n_used <= 2) return down_launch<T, 2>(s, a, n_tok);
            if (a.n_used <= 4) return down_launch<T, 4>(s, a, n_tok);
            if (a.n_used <= 6) return down_launch<T, 6>(s, a, n_tok);
            return down_launch<T, 8>(s, a, n_tok);
        } else {
            return down_launch<T, 1>(s, a, n_tok);
        }
    }
};

cudaError_t check_moe(const char* op, int type, int64_t cols, int n_expert, int n_used, int n_tok, const void* w,
                      const float* x, int64_t x_stride) {
    if (block_weights(type) == 0) return invalid(std::string(op) + ": unsupported weight type " + std::to_string(type));
    if (!cols_ok(type, cols))
        return invalid(std::string(op) + ": rows of " + std::to_string(cols) +
                       " weights are not whole blocks of type " + std::to_string(type));
    if (n_expert < 1 || n_used < 1 || n_used > kMaxUsed || n_tok < 1 || n_tok > 64)
        return invalid(std::string(op) + ": needs n_expert >= 1, 1 <= n_used <= 8, 1 <= n_tok <= 64");
    if ((uintptr_t)w % 16 || (uintptr_t)x % 16 || x_stride % 4)
        return invalid(std::string(op) + ": weights and activations must be 16-byte aligned");
    if (type == TYPE_IQ2_XXS && !iq2_tables()) return invalid(std::string(op) + ": call ds4_cuda_init first");
    return cudaSuccess;
}

// Both gate+up entry points: the checks, the arguments, the launch. route (or null): the choice made in the kernel
// from the router's logits and written to ids_out / weights_out; else ids and weights are read.
cudaError_t gate_up(const char* op, cudaStream_t s, float* mid, const float* h, int64_t h_stride, const void* gate,
                    const void* up, int type, int64_t n_ff, int64_t n_embd, int n_expert, int n_used, int n_tok,
                    float clamp, const int32_t* ids, const float* weights, const RouteIn* route, int32_t* ids_out,
                    float* weights_out, const ds4_cuda_shared_expert* sh = nullptr,
                    const ds4_cuda_sinkhorn* hc = nullptr) {
    cudaError_t e = check_moe(op, type, n_embd, n_expert, n_used, n_tok, gate, h, h_stride);
    if (e != cudaSuccess) return e;
    if ((uintptr_t)up % 16 || n_ff < 1 || (int64_t)n_expert * n_ff > INT32_MAX)
        return invalid(std::string(op) + ": up must be 16-byte aligned, 1 <= n_ff, n_expert * n_ff < 2^31");
    if (route && (!route->logits || !ids_out || !weights_out || n_expert > kRouteMaxExperts ||
                  (route->tid2eid && !route->tokens)))
        return invalid(std::string(op) + ": needs logits, ids and weights, n_expert <= 256, tokens with tid2eid");
    MoeArgs a{mid, 0, h, h_stride, (const uint8_t*)gate, (const uint8_t*)up, n_ff, n_embd,
              (int64_t)row_bytes(type, n_embd), FastDiv((uint32_t)n_ff), n_expert, n_used, ids, weights, clamp,
              false, iq2_tables(), nullptr, route ? *route : RouteIn{}, ids_out, weights_out};
    if (sh) {
        if (!ds4_cuda_moe_shared_ok(type, n_embd, n_tok))
            return invalid(std::string(op) + ": no shared expert here (ds4_cuda_moe_shared_ok)");
        if (!sh->gate || !sh->up || !sh->mid || (uintptr_t)sh->gate % 16 || (uintptr_t)sh->up % 16 || sh->n_ff < 1)
            return invalid(std::string(op) + ": the shared expert needs 16-byte aligned gate and up, mid, n_ff >= 1");
        a.sh_w0 = (const uint8_t*)sh->gate, a.sh_w1 = (const uint8_t*)sh->up, a.sh_rows = (int)sh->n_ff;
        a.sh_row_bytes = (int)row_bytes(TYPE_Q8_0, n_embd), a.sh_clamp = sh->clamp, a.sh_out = sh->mid;
    }
    if (hc) {
        if (!hc->hc || hc->n_tok < 1 || hc->n_tok > 32 || hc->n_iter < 1)
            return invalid(std::string(op) + ": the Sinkhorn's hc needs 1 to 32 tokens and n_iter >= 1");
        a.hc = *hc;
    }
    by_type<GateUpOp>(type, e, s, a, n_tok);
    return e;
}

template <int T>
struct SharedOk {
    static cudaError_t run(bool* ok, int64_t cols) {
        *ok = shared_warps<T, T == TYPE_IQ2_XXS ? kGateUpLaneWarps : kWarps>(cols) > 0;
        return cudaSuccess;
    }
};

__device__ __forceinline__ float swiglu_of(float g, float u, float clamp) {
    return silu(fminf(g, clamp)) * fminf(fmaxf(u, -clamp), clamp);
}

__global__ void swiglu_kernel(float* mid, const float* g, const float* u, int64_t n, float clamp) {
    pdl_trigger();
    pdl_wait();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        mid[i] = swiglu_of(g[i], u[i], clamp);
}

// The same, n a multiple of 32, also writing mid's Q8_0 form as rows of a multiple of 32 values (the int8 values of
// all n, then a float per 32: quantize_rows' rule and quantize_groups' layout): a warp per 32 values.
__global__ void swiglu_q8_kernel(float* mid, const float* g, const float* u, int64_t n, float clamp, uint8_t* xq) {
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t b = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5); b < n / 32; b += warps) {
        const int64_t i = 32 * b + lane;
        const float v = swiglu_of(g[i], u[i], clamp);
        mid[i] = v;
        float dd;
        const float inv = q8_0_inv(warp_max(fabsf(v)), dd);
        xq[i] = (uint8_t)q8_0_value(v, inv);
        if (lane == 0) ((float*)(xq + n))[b] = dd;
    }
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4;
using namespace ds4::cuda;

cudaError_t ds4_cuda_moe_gate_up(cudaStream_t s, float* mid, const float* h, int64_t h_stride, const void* gate,
                                 const void* up, int type, int64_t n_ff, int64_t n_embd, int n_expert,
                                 const int32_t* ids, const float* weights, int n_used, int n_tok, float clamp) {
    clear_error();
    return gate_up("moe_gate_up", s, mid, h, h_stride, gate, up, type, n_ff, n_embd, n_expert, n_used, n_tok, clamp,
                   ids, weights, nullptr, nullptr, nullptr);
}

cudaError_t ds4_cuda_moe_route_gate_up(cudaStream_t s, float* mid, int32_t* ids, float* weights, const float* logits,
                                       const float* bias, const int32_t* tid2eid, const int32_t* tokens, float scale,
                                       bool normalize, const float* h, int64_t h_stride, const void* gate,
                                       const void* up, int type, int64_t n_ff, int64_t n_embd, int n_expert,
                                       int n_used, int n_tok, float clamp, const ds4_cuda_shared_expert* shared,
                                       const ds4_cuda_sinkhorn* hc) {
    clear_error();
    const RouteIn route{logits, bias, tid2eid, tokens, n_expert, n_used, scale, normalize};
    return gate_up("moe_route_gate_up", s, mid, h, h_stride, gate, up, type, n_ff, n_embd, n_expert, n_used, n_tok,
                   clamp, nullptr, nullptr, &route, ids, weights, shared, hc);
}

bool ds4_cuda_moe_shared_ok(int type, int64_t n_embd, int n_tok) {
    bool ok = false;
    cudaError_t e;
    return n_tok >= 1 && n_tok <= 64 && cols_ok(TYPE_Q8_0, n_embd) && by_type<SharedOk>(type, e, &ok, n_embd) && ok;
}

size_t ds4_cuda_moe_down_work_bytes(int type, int n_tok, int n_used, int64_t n_ff) {
    return n_tok * act_bytes_of(type, n_used, n_ff);
}

cudaError_t ds4_cuda_moe_down(cudaStream_t s, float* out, int64_t out_stride, const float* mid, const void* down,
                              int type, int64_t n_embd, int64_t n_ff, int n_expert, const int32_t* ids, int n_used,
                              int n_tok, bool accumulate, void* work, bool work_filled) {
    clear_error();
    cudaError_t e = check_moe("moe_down", type, n_ff, n_expert, n_used, n_tok, down, mid, n_ff);
    if (e != cudaSuccess) return e;
    if (n_embd < 1 || (n_tok > 1 && out_stride < n_embd)) return invalid("moe_down: out_stride shorter than a row");
    if ((uint64_t)n_embd * row_bytes(type, n_ff) >= (1ull << 32)) return invalid("moe_down: an expert spans 4 GiB");
    if ((uintptr_t)work % 16) return invalid("moe_down: work must be 16-byte aligned");
    MoeArgs a{out, out_stride, mid, n_ff, (const uint8_t*)down, nullptr, n_embd, n_ff,
              (int64_t)row_bytes(type, n_ff), FastDiv(), n_expert, n_used, ids, nullptr, 0.0f, accumulate,
              iq2_tables(), nullptr};
    if (work_filled && (!work || act_bytes_of(type, 1, n_ff) == 0))
        return invalid("moe_down: work_filled needs the workspace of a quantized type");
    by_type<DownOp>(type, e, s, a, n_tok, work, work_filled);
    return e;
}

cudaError_t ds4_cuda_swiglu(cudaStream_t s, float* mid, const float* g, const float* u, int64_t n, float clamp,
                            void* xq) {
    clear_error();
    if (n < 1) return invalid("swiglu: n >= 1");
    if (xq) {
        if (n % 32 || (uintptr_t)xq % 16)
            return invalid("swiglu: the Q8_0 form needs n a multiple of 32 and xq 16-byte aligned");
        return launch(swiglu_q8_kernel, dim3((unsigned)std::min<int64_t>(ceil_div(n, 256), 1024)), dim3(256), 0, s,
                      mid, g, u, n, clamp, (uint8_t*)xq);
    }
    return launch(swiglu_kernel, dim3((unsigned)std::min<int64_t>(ceil_div(n, 256), 1024)), dim3(256), 0, s, mid, g,
                  u, n, clamp);
}

cudaError_t ds4_cuda_moe_down_quantize(cudaStream_t s, void* work, const float* mid, int type, int n_tok, int n_used,
                                       int64_t n_ff) {
    clear_error();
    cudaError_t e = check_moe("moe_down_quantize", type, n_ff, 1, n_used, n_tok, work, mid, n_ff);
    if (e != cudaSuccess) return e;
    by_type<MidQuantOp>(type, e, s, (uint8_t*)work, mid, n_tok, n_used, n_ff);
    return e;
}
