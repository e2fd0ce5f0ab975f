// The hyper-connections' combine matrix (MODEL.md 3.2): its Sinkhorn normalization in one thread's registers,
// shared by hc_pre's kernels (norm_hc.cu) and the routed gate+up (moe.cu), which runs it for a decode step's FFN
// entry in a warp that has no other work then.
#pragma once
#include "common.cuh"

namespace ds4::cuda {

constexpr int kHc = 4;                    // streams (n_hc); MODEL.md: 4 in every DS4 file
constexpr int kHcVals = kHc + kHc * kHc;  // per token: the post gates, then the combine matrix

__device__ __forceinline__ float sum4(float a, float b, float c, float d) { return (a + b) + (c + d); }

// 1 / x for a sum + hc_eps (a normal float): the instructions of __frcp_rn's path for such x (the MUFU estimate and
// one Newton step) without its range check, whose branches kept a normalization's 4 reciprocals from overlapping.
__device__ __forceinline__ float rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return fmaf(r, fmaf(-x, r, 1.0f), r);
}

// Each row (column) of the 4x4 matrix c divided by its sum + eps, as a multiplication by the reciprocal.
__device__ __forceinline__ void normalize_rows(float (&c)[kHc][kHc], float eps) {
#pragma unroll
    for (int r = 0; r < kHc; ++r) {
        const float inv = rcp(sum4(c[r][0], c[r][1], c[r][2], c[r][3]) + eps);
#pragma unroll
        for (int j = 0; j < kHc; ++j) c[r][j] *= inv;
    }
}

__device__ __forceinline__ void normalize_cols(float (&c)[kHc][kHc], float eps) {
#pragma unroll
    for (int j = 0; j < kHc; ++j) {
        const float inv = rcp(sum4(c[0][j], c[1][j], c[2][j], c[3][j]) + eps);
#pragma unroll
        for (int r = 0; r < kHc; ++r) c[r][j] *= inv;
    }
}

// Sinkhorn normalization of the 4x4 combine matrix c (logits) in one thread's registers: row softmax, + eps, column
// normalization; then n_iter - 1 times row and column normalization. No step needs another lane (every lane of the
// control warp runs it alike): this serial chain is hc_finish's longest.
__device__ __forceinline__ void sinkhorn(float (&c)[kHc][kHc], int n_iter, float eps) {
#pragma unroll
    for (int r = 0; r < kHc; ++r) {
        const float mx = fmaxf(fmaxf(c[r][0], c[r][1]), fmaxf(c[r][2], c[r][3]));
#pragma unroll
        for (int j = 0; j < kHc; ++j) c[r][j] = expf(c[r][j] - mx);
        const float inv = rcp(sum4(c[r][0], c[r][1], c[r][2], c[r][3]));
#pragma unroll
        for (int j = 0; j < kHc; ++j) c[r][j] = c[r][j] * inv + eps;
    }
    normalize_cols(c, eps);
    for (int it = 1; it < n_iter; ++it) normalize_rows(c, eps), normalize_cols(c, eps);
}

// A token's hc values (kHcVals floats) whose combine matrix hc_pre left as logits (`defer`): the matrix normalized
// in place, the bits hc_pre would have written.
__device__ __forceinline__ void sinkhorn_logits(float* h, int n_iter, float eps) {
    float c[kHc][kHc];
#pragma unroll
    for (int i = 0; i < kHc * kHc; ++i) c[i / kHc][i % kHc] = h[kHc + i];
    sinkhorn(c, n_iter, eps);
#pragma unroll
    for (int i = 0; i < kHc * kHc; ++i) h[kHc + i] = c[i / kHc][i % kHc];
}

}  // namespace ds4::cuda
