// The router's expert choice for one token (MODEL.md 3.4 steps 2-4): made by one warp in route_kernel (a warp per
// token), or in each block of the routed experts' gate+up kernel at decode (so that a decode layer has no launch of
// its own for the choice) by the block's first 256 threads scoring an expert each and one warp picking.
//
// Scores p = sqrt(softplus(logit)) for up to kRouteMaxExperts experts (lane i holds experts i, i + 32, ...); then
// n_used rounds of a warp argmax of p + bias over the experts not yet taken, ordered by (value, lower index) so
// that ties go to the lower index as in ds4 (two warp reductions a round: the largest order-preserving key, then
// the lowest index holding it), or the hash table's experts (tid2eid[tokens[t]]); the weights are
// the chosen experts' unbiased scores, summed in the order chosen, divided by max(sum, 2^-14) when normalizing,
// times the scale.
#pragma once
#include "common.cuh"

namespace ds4::cuda {

constexpr int kRoutePer = 8;                           // experts per lane
constexpr int kRouteMaxExperts = 32 * kRoutePer;
constexpr int kRouteMaxUsed = 16;

struct RouteIn {
    const float* logits;     // (n_tok, n_expert)
    const float* bias;       // (n_expert) or null
    const int32_t* tid2eid;  // (vocabulary, n_used) or null: hash routing by token id
    const int32_t* tokens;   // (n_tok), read with tid2eid
    int n_expert, n_used;
    float scale;
    bool normalize;
};

// Expert score p = sqrt(softplus(z)) and its selection key order_key(p + b) (0: never chosen: off, -inf, NaN; no
// finite key is 0). softplus's three cases are all computed and one selected (the same values as the branches):
// straight-line code, so that a lane's several experts interleave.
__device__ __forceinline__ void route_score(float z, float b, bool on, float& p, uint32_t& key) {
    const float ez = expf(z), l = log1pf(ez);
    p = on ? sqrtf(z > 20.0f ? z : (z < -20.0f ? ez : l)) : 0.0f;
    const float v = p + b;
    key = on && v > -INFINITY ? order_key(v) : 0u;
}

// Expert e's logit z and bias b for token t (0 for both where e is past n_expert).
__device__ __forceinline__ void route_inputs(const RouteIn& r, int t, int e, float& z, float& b) {
    const bool on = e < r.n_expert;
    z = on ? r.logits[(int64_t)t * r.n_expert + e] : 0.0f;
    b = on && r.bias ? r.bias[e] : 0.0f;
}

// The choice from the scores, called by all 32 lanes of a warp: lane i holds experts i, i + 32, ... (p, key; keys
// are cleared as experts are taken); lane 0 writes ids[k] and weights[k] for k < n_used (global or shared memory).
__device__ __forceinline__ void route_pick(const RouteIn& r, int t, const float (&p)[kRoutePer],
                                           uint32_t (&key)[kRoutePer], int32_t* ids, float* weights) {
    const int lane = threadIdx.x & 31;
    float chosen_p[kRouteMaxUsed], sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kRouteMaxUsed; ++k) {
        if (k >= r.n_used) break;
        int id;
        if (r.tid2eid) {
            id = r.tid2eid[(int64_t)r.tokens[t] * r.n_used + k];
        } else {
            uint32_t best = 0;
#pragma unroll
            for (int j = 0; j < kRoutePer; ++j) best = max(best, key[j]);
            best = __reduce_max_sync(0xffffffffu, best);
            uint32_t at = 0x7fffffffu;  // none left: no expert (as an argmax over nothing)
#pragma unroll
            for (int j = kRoutePer - 1; j >= 0; --j)
                if (best != 0 && key[j] == best) at = lane + 32 * j;
            id = (int)__reduce_min_sync(0xffffffffu, at);
#pragma unroll
            for (int j = 0; j < kRoutePer; ++j)
                if (lane + 32 * j == id) key[j] = 0;
        }
        float mine = 0.0f;
#pragma unroll
        for (int j = 0; j < kRoutePer; ++j)
            if (lane + 32 * j == id) mine = p[j];
        chosen_p[k] = __shfl_sync(0xffffffffu, mine, id & 31);
        sum += chosen_p[k];
        if (lane == 0) ids[k] = id;
    }
    if (lane == 0) {
        const float div = r.normalize ? fmaxf(sum, 6.103515625e-5f) : 1.0f;  // ds4's floor, 2^-14
#pragma unroll
        for (int k = 0; k < kRouteMaxUsed; ++k) {
            if (k >= r.n_used) break;
            weights[k] = chosen_p[k] / div * r.scale;
        }
    }
}

// Token t's choice by one warp (all 32 lanes): the scores, then route_pick. Needs n_expert <= kRouteMaxExperts and
// n_used <= kRouteMaxUsed.
__device__ __forceinline__ void route_token(const RouteIn& r, int t, int32_t* ids, float* weights) {
    const int lane = threadIdx.x & 31;
    // Every load first, then the scores: with the loads beside each score's (then branchy) arithmetic each waited
    // for the previous expert's score, 16 trips to memory in a row (the route launch 5.7 -> 3.5 us on an H200).
    float z[kRoutePer], b[kRoutePer];
#pragma unroll
    for (int j = 0; j < kRoutePer; ++j) route_inputs(r, t, lane + 32 * j, z[j], b[j]);
    float p[kRoutePer];
    uint32_t key[kRoutePer];
#pragma unroll
    for (int j = 0; j < kRoutePer; ++j) route_score(z[j], b[j], lane + 32 * j < r.n_expert, p[j], key[j]);
    route_pick(r, t, p, key, ids, weights);
}

// The same choice by a block: thread e < kRouteMaxExperts scores expert e into sp[e] and skey[e] (route_scores,
// every thread of the first kRouteMaxExperts), then one warp picks from them (route_pick_shared) once those threads'
// stores are visible to it (a barrier between).
__device__ __forceinline__ void route_scores(const RouteIn& r, int t, float* sp, uint32_t* skey) {
    const int e = threadIdx.x;
    if (e >= kRouteMaxExperts) return;
    float z, b;
    route_inputs(r, t, e, z, b);
    route_score(z, b, e < r.n_expert, sp[e], skey[e]);
}
__device__ __forceinline__ void route_pick_shared(const RouteIn& r, int t, const float* sp, const uint32_t* skey,
                                                  int32_t* ids, float* weights) {
    const int lane = threadIdx.x & 31;
    float p[kRoutePer];
    uint32_t key[kRoutePer];
#pragma unroll
    for (int j = 0; j < kRoutePer; ++j) p[j] = sp[lane + 32 * j], key[j] = skey[lane + 32 * j];
    route_pick(r, t, p, key, ids, weights);
}

}  // namespace ds4::cuda
