// The routed experts' SwiGLU between the gate/up and the down products (MODEL.md §3.4 FFN step 5), for one ISA
// level. The formula and its exact float32 operations are the contract of ds4_cpu_moe (moe.cpp): no fused
// multiply-add and vf_exp's fixed sequence (simd.h), so every level gives the same bits and a numpy model can
// reproduce them.
#include <algorithm>

#include "kernels.h"
#include "simd.h"

namespace ds4::cpu::DS4_ISA {
namespace {

inline vf swiglu_lanes(vf g, vf u, vf c, vf weight) {
    g = vf_min(c, g);                                     // min(g, c): NaN passes through
    u = vf_min(c, vf_max(vf_sub(vf_zero(), c), u));       // clip(u, -c, c)
    const vf e = vf_exp(vf_sub(vf_zero(), g));            // e^-g
    const vf silu = vf_div(g, vf_add(vf_set1(1.0f), e));  // g / (1 + e^-g)
    return vf_mul(vf_mul(silu, u), weight);
}

}  // namespace

void swiglu(float* mid, const float* g, const float* u, int64_t n, float clamp, float weight) {
    const vf c = vf_set1(clamp), w = vf_set1(weight);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) vf_store(mid + i, swiglu_lanes(vf_load(g + i), vf_load(u + i), c, w));
    if (i < n) {  // the tail through zero-padded lanes
        alignas(64) float gt[kLanes] = {}, ut[kLanes] = {}, mt[kLanes];
        std::copy(g + i, g + n, gt);
        std::copy(u + i, u + n, ut);
        vf_store(mt, swiglu_lanes(vf_load(gt), vf_load(ut), c, w));
        std::copy(mt, mt + (n - i), mid + i);
    }
}

}  // namespace ds4::cpu::DS4_ISA
