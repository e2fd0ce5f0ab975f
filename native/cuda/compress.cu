// The stateful side of compressed attention (MODEL.md 3.7, 3.8): the KV compressors' frontier update and softmax
// pooling, the finish of each emitted row (norm, RoPE, FP8 or Hadamard + FP4, f16 store), the indexer's FP4 query
// path, its scores over the indexer rows and the top-k selection.
//
// Compressor: for few tokens (decode), one block of threads per (segment, 128 output dims). A segment is a run of
// consecutive tokens of one session; the block walks them in order, as ds4's streaming decode does: store the
// token's projected row and score in its frontier row, and at a block end ((pos + 1) mod ratio == 0, read from
// device memory) pool the frontier and reset it. A thread owns its output dim (and at ratio 4 both lanes' columns
// of it), so the frontier needs no barrier: every read of a column follows the same thread's writes. For many
// tokens (prefill) every block that ends in a segment is pooled at once by its own threads, and a second kernel
// leaves the frontier as the walk would. The pooled rows go to `pooled` at their token's row; the finish kernel
// normalizes, rotates and stores them at row (pos + 1) / ratio - 1 of the session's compressed-row array.
//
// Indexer: scores of f16 rows on tensor cores (a warp's 16 keys as mma A fragments in registers, the query's heads
// staged in shared memory as f16 pairs); of f32 rows, and of few tokens over at most 1,024 rows, in 32-row tiles
// of f32 FMAs (the query's heads and a tile of keys in shared memory; a lane per key and 8 head groups). Top-k by a
// 3-pass radix select (12, 10, 10 bits) on order-preserving integer keys in one block per token (one warp finds
// each pass's bin), then an index-ordered compaction that takes the tied rows at the threshold lowest index first
// (the reference's stable sort). Tokens that see at most top_k rows take all of them and need no scores.
#include "common.cuh"
#include "numerics.cuh"

namespace ds4::cuda {
namespace {

constexpr int kCompThreads = 128;
constexpr int kCompParallelTok = 64;  // from this many tokens in a call, blocks pooled in parallel

struct CompressArgs {
    float* pooled;
    const float* kv;
    int64_t kv_stride;
    const float* gate;
    int64_t gate_stride;
    const float* ape;
    const int32_t* pos;
    const int32_t* seg_first;
    const int32_t* seg_len;
    float* const* state_kv;
    float* const* state_score;
    int d, ratio;
};

// Softmax pooling over candidates (kv, score) given by `at(k)` for k < n: 0 when every score is -inf.
template <typename At>
__device__ __forceinline__ float softmax_pool(int n, At at) {
    float m = -INFINITY;
    for (int k = 0; k < n; ++k) m = fmaxf(m, at(k).y);
    if (!isfinite(m)) m = 0.0f;
    float den = 0.0f, acc = 0.0f;
    for (int k = 0; k < n; ++k) {
        const float2 c = at(k);
        const float p = expf(c.y - m);
        den += p;
        acc += p * c.x;
    }
    return den > 0.0f ? acc / den : 0.0f;
}

// Ratio 4 with the thread's 32 frontier values (8 rows x 2 lanes x kv, score) in registers: loaded together at the
// start and stored once at the end, instead of a dependent round trip to memory per read after a write (a decode
// token's update was ~5 such trips).
__device__ void compress_ratio4(const CompressArgs& a, float* kv, float* sc, int first, int n, int j) {
    const int d = a.d, width = 2 * d;
    float ka[8], kb[8], sa[8], sb[8];  // lane A (columns j) and lane B (columns d + j) of rows 0..7
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        ka[k] = kv[k * width + j], kb[k] = kv[k * width + d + j];
        sa[k] = sc[k * width + j], sb[k] = sc[k * width + d + j];
    }
    for (int i = 0; i < n; ++i) {
        const int t = first + i, p = a.pos[t], ph = p % 4;
        const float* kt = a.kv + (int64_t)t * a.kv_stride;
        const float* gt = a.gate + (int64_t)t * a.gate_stride;
        const float* ape = a.ape + (int64_t)ph * width;
        const float k0 = kt[j], k1 = kt[d + j], s0 = gt[j] + ape[j], s1 = gt[d + j] + ape[d + j];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (k == ph) ka[4 + k] = k0, kb[4 + k] = k1, sa[4 + k] = s0, sb[4 + k] = s1;
        if (ph != 3) continue;
        a.pooled[(int64_t)t * d + j] = softmax_pool(8, [&](int k) {
            return k < 4 ? make_float2(ka[k], sa[k]) : make_float2(kb[k], sb[k]);
        });
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // the current block becomes the previous one; its rows empty
            ka[k] = ka[k + 4], kb[k] = kb[k + 4], sa[k] = sa[k + 4], sb[k] = sb[k + 4];
            ka[k + 4] = kb[k + 4] = 0.0f, sa[k + 4] = sb[k + 4] = -INFINITY;
        }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        kv[k * width + j] = ka[k], kv[k * width + d + j] = kb[k];
        sc[k * width + j] = sa[k], sc[k * width + d + j] = sb[k];
    }
}

__global__ void __launch_bounds__(kCompThreads) compress_kernel(CompressArgs a) {
    pdl_trigger();
    pdl_wait();
    const int s = blockIdx.y, j = blockIdx.x * kCompThreads + threadIdx.x, d = a.d, r = a.ratio;
    if (j >= d) return;
    float* kv = a.state_kv[s];
    float* sc = a.state_score[s];
    const int first = a.seg_first[s], n = a.seg_len[s];
    if (r == 4) {  // two overlapping lanes: rows 0..3 the previous block (lane A), 4..7 the current (B)
        compress_ratio4(a, kv, sc, first, n, j);
        return;
    }
    for (int i = 0; i < n; ++i) {  // one lane of r rows, in memory
        const int t = first + i, p = a.pos[t], ph = p % r;
        const float* kt = a.kv + (int64_t)t * a.kv_stride;
        const float* gt = a.gate + (int64_t)t * a.gate_stride;
        kv[ph * d + j] = kt[j];
        sc[ph * d + j] = gt[j] + a.ape[(int64_t)ph * d + j];
        if (ph != r - 1) continue;
        a.pooled[(int64_t)t * d + j] =
            softmax_pool(r, [&](int k) { return make_float2(kv[k * d + j], sc[k * d + j]); });
        for (int k = 0; k < r; ++k) kv[k * d + j] = 0.0f, sc[k * d + j] = -INFINITY;
    }
}

// Position q's (kv, score) in column col from the call's projections: its segment starts at token `first`,
// position p0; width is the frontier's row (coff * d).
__device__ __forceinline__ float2 projected(const CompressArgs& a, int first, int p0, int q, int col, int width) {
    const int64_t t = first + (q - p0);
    return make_float2(a.kv[t * a.kv_stride + col],
                       a.gate[t * a.gate_stride + col] + a.ape[(int64_t)(q % a.ratio) * width + col]);
}

// A long segment's blocks pooled in parallel (the prefill: the in-order walk of compress_kernel kept 4 blocks of
// threads busy for a whole chunk): block (dims, b, segment) pools the b-th block that ends in the segment, reading
// each candidate row from the segment's projections or, for positions before it, from the frontier as the walk
// left it: at ratio 128 row q mod 128; at ratio 4 rows 4 + q mod 4 for the frontier's current (partial) block,
// q mod 4 for the block before. The same candidates in the same order as the walk: the same bits. The frontier
// is rewritten after (compress_state_kernel).
__global__ void __launch_bounds__(kCompThreads) compress_blocks_kernel(CompressArgs a) {
    pdl_trigger();
    pdl_wait();
    const int s = blockIdx.z, j = blockIdx.x * kCompThreads + threadIdx.x, d = a.d, r = a.ratio;
    const int first = a.seg_first[s], n = a.seg_len[s];
    if (j >= d || n < 1) return;
    const int p0 = a.pos[first], p = (p0 / r + (int)blockIdx.y) * r + r - 1;  // the block's last position
    if (p >= p0 + n) return;
    const int width = r == 4 ? 2 * d : d, cur = p0 & ~3;  // cur: the walk's current block at ratio 4
    const float* skv = a.state_kv[s];
    const float* ssc = a.state_score[s];
    auto at = [&](int q, int col, int srow) {  // position q's (kv, score) in column col; srow: its frontier row
        return q < p0 ? make_float2(skv[srow * width + col], ssc[srow * width + col])
                      : projected(a, first, p0, q, col, width);
    };
    float v;
    if (r == 4) {
        v = softmax_pool(8, [&](int k) {
            const int q = p - 7 + k;
            return k < 4 ? at(q, j, q >= cur ? 4 + (q & 3) : q & 3) : at(q, d + j, 4 + (q & 3));
        });
    } else {
        v = softmax_pool(r, [&](int k) { return at(p - r + 1 + k, j, k); });
    }
    a.pooled[(int64_t)(first + (p - p0)) * d + j] = v;
}

// The frontier after a segment pooled by compress_blocks_kernel, as the walk leaves it (pe: the position after the
// segment): the rows of positions pe & ~(r - 1) .. pe - 1 hold them, the rest of that block's rows are empty; at
// ratio 4 rows 0..3 hold the block before it, both lanes (moved from rows 4..7 where it was the frontier's current
// block). Each thread owns its columns: it reads what moves before it writes.
__global__ void __launch_bounds__(kCompThreads) compress_state_kernel(CompressArgs a) {
    pdl_trigger();
    pdl_wait();
    const int s = blockIdx.y, j = blockIdx.x * kCompThreads + threadIdx.x, d = a.d, r = a.ratio;
    const int first = a.seg_first[s], n = a.seg_len[s];
    if (j >= d || n < 1) return;
    const int p0 = a.pos[first], pe = p0 + n, base = pe / r * r;
    const int lanes = r == 4 ? 2 : 1, width = lanes * d, cur = p0 & ~3;
    float* skv = a.state_kv[s];
    float* ssc = a.state_score[s];
    if (r == 4) {  // rows 0..3: the block before `base`; moved from rows 4..7 where it was the current block
        float2 prev[4][2];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int q = base - 4 + k, row = q >= p0 || q < cur ? k : 4 + k;
#pragma unroll
            for (int l = 0; l < 2; ++l)
                prev[k][l] = q >= p0 ? projected(a, first, p0, q, l * d + j, width)
                                     : make_float2(skv[row * width + l * d + j], ssc[row * width + l * d + j]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
            for (int l = 0; l < 2; ++l)
                skv[k * width + l * d + j] = prev[k][l].x, ssc[k * width + l * d + j] = prev[k][l].y;
    }
    const int row0 = r == 4 ? 4 : 0;  // the current block's rows
    for (int k = 0; k < r; ++k) {
        const int q = base + k;
        if (q < p0) continue;  // already there
        for (int l = 0; l < lanes; ++l) {
            const float2 v =
                q < pe ? projected(a, first, p0, q, l * d + j, width) : make_float2(0.0f, -INFINITY);
            skv[(row0 + k) * width + l * d + j] = v.x, ssc[(row0 + k) * width + l * d + j] = v.y;
        }
    }
}

struct FinishArgs {
    const float* pooled;
    const float* norm;
    const int32_t* pos;
    void* const* dst;
    const double* inv_freq;
    int d, ratio, n_rot, mode, n_nope;
    float eps;
};

// One block per token, one warp per 128 dims (lane: 4 consecutive values); tokens that end no block return.
template <typename Out>
__global__ void comp_finish_kernel(FinishArgs a) {
    __shared__ float part[4];
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, p = a.pos[t];
    if ((p + 1) % a.ratio) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, i0 = warp * 128 + 4 * lane;
    const float4 x4 = *(const float4*)(a.pooled + (int64_t)t * a.d + i0);
    float v[4] = {x4.x, x4.y, x4.z, x4.w};
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) ss += v[k] * v[k];
    ss = warp_sum(ss);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += part[w];
    const float rms = sqrtf(total / (float)a.d + a.eps);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = v[k] / rms * a.norm[i0 + k];
    // RoPE on the tail at the block's first position.
    const int tail = a.d - a.n_rot;
    if (i0 >= tail) {
#pragma unroll
        for (int k = 0; k < 4; k += 2) {
            float c, sn;
            rope_angle(p + 1 - a.ratio, a.inv_freq[(i0 + k - tail) / 2], c, sn);
            const float x0 = v[k], x1 = v[k + 1];
            v[k] = x0 * c - x1 * sn, v[k + 1] = x0 * sn + x1 * c;
        }
    }
    if (a.mode == 1) {  // FP8 of the unrotated dims: 64-value blocks are half-warps
        const float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
        float m = amax;
#pragma unroll
        for (int o = 1; o < 16; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if ((i0 & ~63) < a.n_nope) {
            const float scale = fp8_scale(m), inv = 1.0f / scale;
#pragma unroll
            for (int k = 0; k < 4; ++k) v[k] = e4m3_roundtrip(v[k], scale, inv);
        }
    } else if (a.mode == 2) {
        hadamard128_fp4(v);
    }
    Out* dst = (Out*)a.dst[t] + (int64_t)((p + 1) / a.ratio - 1) * a.d + i0;
    if constexpr (sizeof(Out) == 2) {
        *(__half2*)dst = __floats2half2_rn(v[0], v[1]);
        *(__half2*)(dst + 2) = __floats2half2_rn(v[2], v[3]);
    } else {
        *(float4*)dst = make_float4(v[0], v[1], v[2], v[3]);
    }
}

// One warp per vector (lane i: elements 4i .. 4i + 3). With pos, RoPE on its last n_rot values first (vector r is
// token r / vec_per_tok), as rope_kernel rotates them; the angles come before the dependent-launch wait (the
// positions are the step's table).
__global__ void hadamard_fp4_kernel(float* x, int64_t n_vec, const int32_t* pos, const double* inv_freq, int n_rot,
                                    int vec_per_tok) {
    pdl_trigger();
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31, j = 2 * lane - (128 - n_rot) / 2;  // the lane's first rotated pair
    const bool rot = pos && r < n_vec && j >= 0;
    float c0 = 1.0f, s0 = 0.0f, c1 = 1.0f, s1 = 0.0f;
    if (rot) {
        const int p = pos[r / vec_per_tok];
        rope_angle(p, inv_freq[j], c0, s0);
        rope_angle(p, inv_freq[j + 1], c1, s1);
    }
    pdl_wait();
    if (r >= n_vec) return;
    float4* ptr = (float4*)(x + r * 128) + lane;
    float4 x4 = *ptr;
    if (rot) x4 = rope4(x4, c0, s0, c1, s1);
    float v[4] = {x4.x, x4.y, x4.z, x4.w};
    hadamard128_fp4(v);
    *ptr = make_float4(v[0], v[1], v[2], v[3]);
}

constexpr int kScoreRows = 32, kScoreGroups = 8, kIdxDim = 128;
constexpr int kKeyPitch = kIdxDim + 4;  // floats per staged key: 8 lanes' 16-byte loads fall on distinct banks
constexpr int kScoreHeads = 8;          // heads a thread keeps in flight (its warp's heads g, g + 8, ...)

// scores[t, c] = sum_h w[t, h] * w_scale * relu(q[t, h] . key_c) for c < n_vis[t], tokens with n_vis > top_k.
// A block scores 32 keys: lane r of warp g takes key r against heads g, g + 8, ..., each dot in two chains over
// the even and odd dims, the heads' terms added in head order, the warps' partial sums in warp order. The keys
// sit in registers 4 dims at a time and the query (a broadcast) is read 16 bytes at a time: one shared-memory
// load per 3.6 FMAs (a load per FMA took 27 us for 513 keys at 64 heads).
template <typename K>
__global__ void __launch_bounds__(32 * kScoreGroups) indexer_score_kernel(float* scores, int64_t score_stride,
                                                                          const float* q, const float* w,
                                                                          float w_scale, const void* const* keys,
                                                                          const int32_t* n_vis, int n_head,
                                                                          int top_k) {
    extern __shared__ __align__(16) float sm[];
    float* qs = sm;                               // n_head x 128
    float* ks = qs + n_head * kIdxDim;            // 32 rows x kKeyPitch
    float* ws = ks + kScoreRows * kKeyPitch;      // n_head
    float* partial = ws + n_head;                 // kScoreGroups x 32
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.y, n = n_vis[t], c0 = blockIdx.x * kScoreRows;
    if (n <= top_k || c0 >= n) return;
    // Every load in flight at once: the query by cp.async, each thread's key pieces into registers before any is
    // converted and stored (a loop of load-then-store waits on each load in turn).
    const float* qg = q + (int64_t)t * n_head * kIdxDim;
    for (int i = threadIdx.x; i < n_head * kIdxDim / 4; i += blockDim.x) cp_async16(qs + 4 * i, qg + 4 * i);
    cp_async_commit();
    constexpr int kPieces = kScoreRows * kIdxDim / 4 / (32 * kScoreGroups);  // 4 dims each, per thread
    const K* kb = (const K*)keys[t];
    K raw[kPieces][4];
#pragma unroll
    for (int u = 0; u < kPieces; ++u) {
        const int i = threadIdx.x + u * blockDim.x, r = i / (kIdxDim / 4), k = 4 * (i % (kIdxDim / 4));
        const K* src = kb + (int64_t)min(c0 + r, n - 1) * kIdxDim + k;  // rows past n: a copy, never scored
#pragma unroll
        for (int e = 0; e < 4; ++e) raw[u][e] = src[e];
    }
    for (int h = threadIdx.x; h < n_head; h += blockDim.x) ws[h] = w[(int64_t)t * n_head + h] * w_scale;
#pragma unroll
    for (int u = 0; u < kPieces; ++u) {
        const int i = threadIdx.x + u * blockDim.x, r = i / (kIdxDim / 4), k = 4 * (i % (kIdxDim / 4));
        *(float4*)(ks + r * kKeyPitch + k) =
            make_float4((float)raw[u][0], (float)raw[u][1], (float)raw[u][2], (float)raw[u][3]);
    }
    cp_async_wait<0>();
    __syncthreads();
    const int r = threadIdx.x & 31, g = threadIdx.x >> 5;
    const float4* kr = (const float4*)(ks + r * kKeyPitch);
    float acc = 0.0f;
    for (int h0 = g; h0 < n_head; h0 += kScoreGroups * kScoreHeads) {
        float d0[kScoreHeads], d1[kScoreHeads];
#pragma unroll
        for (int j = 0; j < kScoreHeads; ++j) d0[j] = d1[j] = 0.0f;
#pragma unroll 4
        for (int k4 = 0; k4 < kIdxDim / 4; ++k4) {
            const float4 kv = kr[k4];
#pragma unroll
            for (int j = 0; j < kScoreHeads; ++j) {
                const int h = h0 + kScoreGroups * j;
                if (h < n_head) {
                    const float4 qv = ((const float4*)(qs + h * kIdxDim))[k4];
                    d0[j] = fmaf(qv.x, kv.x, d0[j]), d1[j] = fmaf(qv.y, kv.y, d1[j]);
                    d0[j] = fmaf(qv.z, kv.z, d0[j]), d1[j] = fmaf(qv.w, kv.w, d1[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kScoreHeads; ++j) {
            const int h = h0 + kScoreGroups * j;
            if (h < n_head) acc = fmaf(ws[h], fmaxf(d0[j] + d1[j], 0.0f), acc);
        }
    }
    partial[g * kScoreRows + r] = acc;
    __syncthreads();
    if (g == 0 && c0 + r < n) {
        float s = 0.0f;
        for (int k = 0; k < kScoreGroups; ++k) s += partial[k * kScoreRows + r];
        scores[(int64_t)t * score_stride + c0 + r] = s + 0.0f;  // -0 -> +0: one key per value
    }
}

size_t indexer_score_smem(int n_head) {
    return ((size_t)n_head * (kIdxDim + 1) + kScoreRows * kKeyPitch + kScoreGroups * kScoreRows) * sizeof(float);
}

// The same scores for f16 keys (faithful numerics) on tensor cores. A block takes 16 keys per warp, each warp
// keeping its keys' A fragments in registers across the block's tokens (loaded again only for another session's
// keys or a token that sees rows past the loaded ones); per token the query heads are staged in shared memory as
// f16 high and low parts scaled per head by a power of two (split_f16: ~22 bits; the FP4 path's values are exact in
// the high part) and mma m16n8k16 forms the key x head dots in f32. The dims of each 32-dim chunk are taken in an
// order of our own, the same for keys and query, such that every lane's fragments of two k-steps are 16 contiguous
// bytes: one load for them. Heads past n_head are zero queries with weight 0, multiplied like the others (all 64:
// with a loop bound of n_head's 8-head tiles every product waited on its own shared-memory load). Each warp holds its
// heads of the next token's query in registers, loaded before this token's products.
constexpr int kTcPitch = 160;  // halves per staged head: 320 bytes, 16-byte loads of 8 heads free of bank conflicts
constexpr int kTcHeads = 64;   // at most

// The two k-steps of one 32-dim chunk: the lane's 8 halves of rows g and g + 8 (a), of head g (b), in that order.
__device__ __forceinline__ void mma_chunk(float (&acc)[4], const uint32_t (&a)[2][4], uint4 b) {
    const uint32_t a0[4] = {a[0][0], a[1][0], a[0][1], a[1][1]}, a1[4] = {a[0][2], a[1][2], a[0][3], a[1][3]};
    const uint32_t b0[2] = {b.x, b.y}, b1[2] = {b.z, b.w};
    mma_f16(acc, a0, b0);
    mma_f16(acc, a1, b1);
}

// WALK (decode): a block takes row tiles blockIdx.x, + gridDim.x, ... of its one token, the query staged once and
// the next tile's fragments loaded while this one's products run (at 256K keys a block per tile staged the query
// 2,048 times: 60 us for 16 us of key bytes; tok_per_block must be 1). Otherwise (prefill) the block's one tile for
// its tok_per_block tokens.
template <int WARPS, bool WALK>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS)
    indexer_score_tc_kernel(float* scores, int64_t score_stride, const float* q, const float* w, float w_scale,
                            const void* const* keys, const int32_t* n_vis, int n_tok, int n_head, int top_k,
                            int tok_per_block) {
    constexpr int kHpw = kTcHeads / WARPS, kTile = 16 * WARPS;  // heads per warp, keys per tile
    extern __shared__ __align__(16) __half qsm[];
    __half* qhi = qsm;                                    // kTcHeads x kTcPitch
    __half* qlo = qhi + kTcHeads * kTcPitch;              // the same
    float* hscale = (float*)(qlo + kTcHeads * kTcPitch);  // 2^e per head
    float* hw = hscale + kTcHeads;                        // w_h * w_scale, 0 past n_head
    pdl_trigger();
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, j = lane & 3;
    const int c_first = blockIdx.x * kTile;
    const int t0 = blockIdx.y * tok_per_block, t_end = min(n_tok, t0 + (WALK ? 1 : tok_per_block));
    auto live = [&](int t) { return t < t_end && n_vis[t] > top_k && c_first < n_vis[t]; };  // the block's alike
    float4 qv[kHpw];
    float wl;  // lane i < kHpw: the weight of the warp's i-th head
    auto fetch = [&](int t) {  // all loads in flight together (one at a time, each head's weight cost ~0.6 us)
        const bool on = live(t);
#pragma unroll
        for (int i = 0; i < kHpw; ++i) {
            const int h = warp + WARPS * i;
            qv[i] = on && h < n_head ? ((const float4*)(q + ((int64_t)t * n_head + h) * kIdxDim))[lane]
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        const int h = warp + WARPS * lane;
        wl = on && lane < kHpw && h < n_head ? w[(int64_t)t * n_head + h] * w_scale : 0.0f;
    };
    // load_chunk: chunk c of the A fragments of the tile at c0, rows c0 + 16 warp + g and + 8 (past n: copies of the
    // last row, never stored).
    uint32_t a[4][2][4];  // 32-dim chunk, row (row, row + 8), its 8 halves from 32 c + 8 j
    auto load_chunk = [&](int c, const __half* kb, int c0, int n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint4 v = *(const uint4*)(kb + (int64_t)min(c0 + 16 * warp + g + 8 * r, n - 1) * kIdxDim + 8 * j +
                                            32 * c);
            a[c][r][0] = v.x, a[c][r][1] = v.y, a[c][r][2] = v.z, a[c][r][3] = v.w;
        }
    };
    const void* loaded = nullptr;
    int n_loaded = 0;
    fetch(t0);
    for (int t = t0; t < t_end; ++t) {
        if (!live(t)) {
            fetch(t + 1);
            continue;
        }
        const int n = n_vis[t];
        const void* kp = keys[t];
        if (kp != loaded || (n > n_loaded && c_first + kTile > n_loaded)) {
#pragma unroll
            for (int c = 0; c < 4; ++c) load_chunk(c, (const __half*)kp, c_first, n);
            loaded = kp, n_loaded = n;
        }
        __syncthreads();  // the last token's query is read
        bool lo_used = false;
#pragma unroll
        for (int i = 0; i < kHpw; ++i) {
            const int h = warp + WARPS * i;
            const float4 v = qv[i];
            const float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
            const int e = f16_scale_exp(warp_max(amax));
            const float inv = pow2f(-e), f[4] = {v.x, v.y, v.z, v.w};
            __half hi[4], lo[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                split_f16(f[k] * inv, hi[k], lo[k]);
                lo_used |= __half2float(lo[k]) != 0.0f;
            }
            *(uint2*)(qhi + h * kTcPitch + 4 * lane) = *(const uint2*)hi;
            *(uint2*)(qlo + h * kTcPitch + 4 * lane) = *(const uint2*)lo;
            const float wh = __shfl_sync(0xffffffffu, wl, i);
            if (lane == 0) hscale[h] = pow2f(e), hw[h] = wh;
        }
        lo_used = __syncthreads_or(lo_used);  // not in the FP4 path's queries: half the products and loads
        if constexpr (!WALK) fetch(t + 1);
        // WALK: each chunk's fragments of the next tile are loaded once this one's are used, and the tile after it
        // is brought into L2 (lane l: half l / 16 of row l % 16 of the warp's 16)
        auto to_l2 = [&](int c) {
            const int r = c + 16 * warp + (lane & 15);
            if (r < n)
                asm volatile("prefetch.global.L2 [%0];" ::"l"((const __half*)kp + (int64_t)r * kIdxDim +
                                                               (lane >> 4) * (kIdxDim / 2)));
        };
        if (WALK) to_l2(c_first + gridDim.x * kTile);
        for (int c0 = c_first;;) {
            const int c_next = WALK ? c0 + gridDim.x * kTile : n;
            if (WALK) to_l2(c_next + gridDim.x * kTile);
            float acc[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    const int off = (8 * nt + g) * kTcPitch + 32 * c + 8 * j;
                    mma_chunk(acc[nt], a[c], *(const uint4*)(qhi + off));
                    if (lo_used) mma_chunk(acc[nt], a[c], *(const uint4*)(qlo + off));
                }
                if (WALK && c_next < n) load_chunk(c, (const __half*)kp, c_next, n);
            }
            float s0 = 0.0f, s1 = 0.0f;  // rows row and row + 8, over the lane's heads 8 nt + 2 j + {0, 1}
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int h = 8 * nt + 2 * j + e;
                    s0 = fmaf(hw[h], fmaxf(acc[nt][e] * hscale[h], 0.0f), s0);
                    s1 = fmaf(hw[h], fmaxf(acc[nt][2 + e] * hscale[h], 0.0f), s1);
                }
            }
#pragma unroll
            for (int o = 1; o < 4; o <<= 1) {
                s0 += __shfl_xor_sync(0xffffffffu, s0, o);
                s1 += __shfl_xor_sync(0xffffffffu, s1, o);
            }
            float* out = scores + (int64_t)t * score_stride;
            const int row = c0 + 16 * warp + g;
            if (j == 0 && row < n) out[row] = s0 + 0.0f;  // -0 -> +0: one key per value
            if (j == 0 && row + 8 < n) out[row + 8] = s1 + 0.0f;
            if (c_next >= n) break;
            c0 = c_next;
        }
    }
}

constexpr int kTopkThreads = 1024, kTopkRegs = 16;  // keys per thread kept in registers: 16,384 per block

// The top k of one token's n > k scores, by the whole block, or with C > 1 by a thread block cluster of C blocks
// (rank r: the token's scores r P .. r P + P - 1, P = ceil(n / C); ClusterBins adds the clusters' counts). The
// block's n_b keys: warp w holds those at [32 m w, 32 m (w + 1)), m = ceil(n_b / threads), lane l those at 32 m w +
// 32 j + l: with REGS in registers (m <= kTopkRegs), else read from global memory in each pass. The radix select
// finds the k-th key; then each warp counts what it takes, one scan over the warps (and, in a cluster, over the
// blocks before this one) gives each its first output place, and the warps write their indices in order by
// ballots (a block-wide scan per 1,024 scores took ~15 us for 16K of them).
struct TopkSmem {
    uint32_t hist[kWideHistWords];
    uint32_t tot[kWideHistWords / 4];  // a cluster's slice sums (C >= 4)
    int pick[4], warp_out[kTopkThreads / 32], warp_eq[kTopkThreads / 32], cnt[2], eq_blk;
};

template <bool REGS, int C>
__device__ __forceinline__ void topk_block(int32_t* out, const float* sc, int n, int k, TopkSmem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warp = blockDim.x >> 5;
    const int rank = C > 1 ? (int)blockIdx.y : 0, per = (int)ceil_div(n, C), first = rank * per;
    const int n_b = max(min(n - first, per), 0);
    sc += first;
    const int m = (int)ceil_div(n_b, blockDim.x), base = 32 * m * warp + lane;
    uint32_t key[REGS ? kTopkRegs : 1];
    if constexpr (REGS) {
#pragma unroll
        for (int j = 0; j < kTopkRegs; ++j) {
            const int i = base + 32 * j;
            key[j] = j < m && i < n_b ? order_key(sc[i]) : 0u;
        }
    }
    auto each_key = [&](auto f) {
        if constexpr (REGS) {
#pragma unroll
            for (int j = 0; j < kTopkRegs; ++j) {
                if (j == m) break;  // m is the block's: every lane of a warp stops together
                const int i = base + 32 * j;
                f(key[j], i < n_b ? i : -1);
            }
        } else {
            each_key_batched([&](int i) { return order_key(sc[i]); }, [&](int j) { return base + 32 * j; }, m, n_b,
                             f);
        }
    };
    // The k-th largest key; every larger key and the first take_eq equal ones are taken, in index order.
    int take_eq;
    uint32_t thr;
    if constexpr (C > 1)
        thr = radix_select_wide(each_key, k, sm.hist, sm.pick, &take_eq,
                                ClusterBins<C, kTopkThreads>{sm.hist, sm.tot});
    else
        thr = radix_select_wide(each_key, k, sm.hist, sm.pick, &take_eq);
    int n_gt = 0, n_eq = 0;
    each_key([&](uint32_t v, int i) {
        n_gt += __popc(__ballot_sync(0xffffffffu, i >= 0 && v > thr));
        n_eq += __popc(__ballot_sync(0xffffffffu, i >= 0 && v == thr));
    });
    if (lane == 0) sm.warp_out[warp] = n_gt, sm.warp_eq[warp] = n_eq;
    __syncthreads();
    const bool mine = warp == 0 && lane < n_warp;
    const int g = mine ? sm.warp_out[lane] : 0, e = mine ? sm.warp_eq[lane] : 0;
    int at_blk = 0;  // the keys taken in the cluster's blocks before this one; take_eq becomes this block's
    if constexpr (C > 1) {
        if (warp == 0) {
            const int gs = warp_sum(g), es = warp_sum(e);
            if (lane == 0) sm.cnt[0] = gs, sm.cnt[1] = es;
        }
        cluster_sync();
        if (warp == 0) {
            const int* c = cluster_at(sm.cnt, min(lane, C - 1));
            const int gj = lane < C ? c[0] : 0, ej = lane < C ? c[1] : 0;
            const int e_inc = warp_inclusive(ej);
            const int took = gj + min(max(take_eq - (e_inc - ej), 0), ej);
            const int t_inc = warp_inclusive(took);
            at_blk = __shfl_sync(0xffffffffu, t_inc - took, rank);
            const int eq_blk = __shfl_sync(0xffffffffu, e_inc - ej, rank);
            if (lane == 0) sm.eq_blk = eq_blk;
        }
        cluster_arrive();  // the last reads of other blocks' shared memory are done (cluster_wait before the exit)
        __syncthreads();
        take_eq -= sm.eq_blk;
    }
    if (warp == 0) {  // per warp: the equal keys before it, then the taken ones before it
        const int e_inc = warp_inclusive(e);
        const int took = g + min(max(take_eq - (e_inc - e), 0), e);
        const int t_inc = warp_inclusive(took);
        if (lane < n_warp) sm.warp_out[lane] = at_blk + t_inc - took, sm.warp_eq[lane] = e_inc - e;
    }
    __syncthreads();
    int at = sm.warp_out[warp], eq_before = sm.warp_eq[warp];
    const uint32_t below = (1u << lane) - 1u;
    each_key([&](uint32_t v, int i) {
        const uint32_t eq = __ballot_sync(0xffffffffu, i >= 0 && v == thr);
        const bool take = (i >= 0 && v > thr) || ((eq >> lane & 1u) && eq_before + __popc(eq & below) < take_eq);
        const uint32_t taken = __ballot_sync(0xffffffffu, take);
        if (take) out[at + __popc(taken & below)] = first + i;
        at += __popc(taken);
        eq_before += __popc(eq);
    });
    if constexpr (C > 1) cluster_wait();
}

// sel[t, :] = the indices of the k largest of scores[t, c < n_vis[t]] (ties to the lower index) in index order;
// where n_vis <= k, 0 .. n - 1 and then -1. One block per token (block x), or a cluster of C (blocks y).
template <int C>
__global__ void __launch_bounds__(kTopkThreads) topk_kernel(int32_t* sel, const float* scores, int64_t score_stride,
                                                            const int32_t* n_vis, int k) {
    __shared__ __align__(16) TopkSmem sm;
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, n = n_vis[t];
    int32_t* out = sel + (int64_t)t * k;
    if (n <= k) {  // every block of the token's cluster alike: no barrier waits for another
        for (int i = threadIdx.x + blockIdx.y * blockDim.x; i < k; i += blockDim.x * C) out[i] = i < n ? i : -1;
        return;
    }
    const float* sc = scores + (int64_t)t * score_stride;
    if (ceil_div(n, C) <= kTopkThreads * kTopkRegs)
        topk_block<true, C>(out, sc, n, k, sm);
    else
        topk_block<false, C>(out, sc, n, k, sm);
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

cudaError_t ds4_cuda_compress(cudaStream_t s, float* pooled, const float* kv, int64_t kv_stride, const float* gate,
                              int64_t gate_stride, const float* ape, const int32_t* pos, const int32_t* seg_first,
                              const int32_t* seg_len, float* const* state_kv, float* const* state_score, int n_seg,
                              int d, int ratio, int n_tok, int path) {
    clear_error();
    if (n_seg < 1 || n_seg > 65535 || d < 1 || (ratio != 4 && ratio != 128) || !pos || !seg_first || !seg_len ||
        !state_kv || !state_score || n_tok < n_seg || path < 0 || path > 2)
        return invalid("compress: needs 1 <= n_seg <= 65535, n_tok >= n_seg, d >= 1, ratio 4 or 128, path 0-2, "
                       "and every table");
    const CompressArgs a{pooled, kv, kv_stride, gate, gate_stride, ape, pos, seg_first, seg_len, state_kv,
                         state_score, d, ratio};
    const unsigned gx = (unsigned)ceil_div(d, kCompThreads);
    if (path == 1 || (path == 0 && n_tok < kCompParallelTok))
        return launch(compress_kernel, dim3(gx, n_seg), dim3(kCompThreads), 0, s, a);
    // a segment of n tokens ends at most n / ratio + 1 blocks
    cudaError_t e = launch(compress_blocks_kernel, dim3(gx, (unsigned)(n_tok / ratio + 1), n_seg), dim3(kCompThreads),
                           0, s, a);
    return e != cudaSuccess ? e : launch(compress_state_kernel, dim3(gx, n_seg), dim3(kCompThreads), 0, s, a);
}

cudaError_t ds4_cuda_comp_finish(cudaStream_t s, void* const* dst, const float* pooled, const float* norm,
                                 const int32_t* pos, const double* inv_freq, int n_tok, int d, int ratio, int n_rot,
                                 int mode, int n_nope, float eps, bool f32_rows) {
    clear_error();
    if (n_tok < 1 || n_tok > 0x7fffffff || (d != 128 && d != 256 && d != 512) || ratio < 1 || n_rot < 2 ||
        n_rot % 4 || n_rot > 128 || mode < 0 || mode > 2 || (mode == 2 && d != 128) || n_nope % 64 ||
        n_nope > d - n_rot || !dst || !pos || !norm || (uintptr_t)pooled % 16)
        return invalid("comp_finish: needs d 128/256/512 (128 for Hadamard + FP4), n_rot a multiple of 4 up to "
                       "128, n_nope a multiple of 64 before the rotated tail, mode 0..2");
    const FinishArgs a{pooled, norm, pos, dst, inv_freq, d, ratio, n_rot, mode, n_nope, eps};
    return launch(f32_rows ? comp_finish_kernel<float> : comp_finish_kernel<__half>, dim3((unsigned)n_tok),
                  dim3(32 * (d / 128)), 0, s, a);
}

cudaError_t ds4_cuda_hadamard_fp4(cudaStream_t s, float* x, int64_t n_vec, const int32_t* pos,
                                  const double* inv_freq, int n_rot, int vec_per_tok) {
    clear_error();
    if (n_vec < 1 || (uintptr_t)x % 16) return invalid("hadamard_fp4: needs n_vec >= 1 and 16-byte aligned x");
    if (pos && (!inv_freq || n_rot < 4 || n_rot % 4 || n_rot > 128 || vec_per_tok < 1))
        return invalid("hadamard_fp4: RoPE needs its frequencies, n_rot a multiple of 4 up to 128, vec_per_tok >= 1");
    return launch(hadamard_fp4_kernel, dim3((unsigned)ceil_div(n_vec, 4)), dim3(128), 0, s, x, n_vec, pos, inv_freq,
                  pos ? n_rot : 0, vec_per_tok);
}

cudaError_t ds4_cuda_indexer_scores(cudaStream_t s, float* scores, int64_t score_stride, const float* q,
                                    const float* w, float w_scale, const void* const* keys, const int32_t* n_vis,
                                    int n_tok, int n_head, int dim, int cap, int top_k, bool f32_rows) {
    clear_error();
    if (dim != kIdxDim || n_tok < 1 || n_tok > 65535 || n_head < 1 || cap < 1 || score_stride < cap || !keys ||
        !n_vis || (uintptr_t)q % 16)
        return invalid("indexer_scores: needs dim 128, 1 <= n_tok <= 65535, n_head >= 1, cap <= score_stride, q "
                       "16-byte aligned");
    const bool many = n_tok >= 64;
    if (!f32_rows && n_head <= kTcHeads && (many || cap > 1024)) {
        // Decode: tiles of 128 keys, at most as many blocks per token as run at once over the tokens (16K keys: 128
        // blocks of one tile); many tokens (prefill): 256 keys and 8 tokens per block, the keys' fragments loaded
        // once for them. Few tokens over at most 1,024 keys take the FMA kernel: its chain is shorter (H200, one
        // token: 4.9 against 6.4 us at 514 keys, 9.7 against 6.5 at 4,096).
        const int tpb = many ? 8 : 1, warps = many ? 16 : 8;  // 16 keys per warp
        auto kernel = many ? indexer_score_tc_kernel<16, false> : indexer_score_tc_kernel<8, true>;
        const size_t smem = 2 * kTcHeads * kTcPitch * sizeof(__half) + 2 * kTcHeads * sizeof(float);
        cudaError_t e = allow_smem(kernel, smem);
        if (e != cudaSuccess) return e;
        int64_t gx = ceil_div(cap, 16 * warps);
        if (!many) gx = std::min<int64_t>(gx, std::max(1, resident_blocks(kernel, 32 * warps, smem) / n_tok));
        return launch(kernel, dim3((unsigned)gx, (unsigned)ceil_div(n_tok, tpb)),
                      dim3(32 * warps), smem, s, scores, score_stride, q, w, w_scale, keys, n_vis, n_tok, n_head,
                      top_k, tpb);
    }
    const size_t smem = indexer_score_smem(n_head);
    auto kernel = f32_rows ? indexer_score_kernel<float> : indexer_score_kernel<__half>;
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    return launch(kernel, dim3((unsigned)ceil_div(cap, kScoreRows), n_tok), dim3(32 * kScoreGroups), smem, s, scores,
                  score_stride, q, w, w_scale, keys, n_vis, n_head, top_k);
}

cudaError_t ds4_cuda_topk(cudaStream_t s, int32_t* sel, const float* scores, int64_t score_stride,
                          const int32_t* n_vis, int n_tok, int k, int cluster) {
    clear_error();
    if (n_tok < 1 || n_tok > 0x7fffffff || k < 1 || !n_vis || (cluster != 0 && cluster != 1 && cluster != 4 &&
                                                                cluster != 8 && cluster != 16))
        return invalid("topk: needs n_tok >= 1, k >= 1, cluster 0 (by the capacity), 1, 4, 8 or 16");
    // A token's keys spread over a thread block cluster where one block would hold more than 8,192 of them in decode
    // (H200, one token: 8K keys 8.2 us by one block, 9.4 by 16; 16K 11.6 / 9.5; 64K 57 / 10.7; 256K 216 / 15.4),
    // more than 16,384 in prefill (whose many tokens fill the device with a block each: only to keep the keys in
    // registers). A decode step's clusters should all run at once: smaller ones where they would not (8 tokens in
    // clusters of 16 took two rounds), unless their blocks would then read their keys from memory; where none fit
    // (before sm_90, or no GPC with room), one block. A size asked for is kept where it runs at all.
    static int fit[17] = {};  // clusters of c blocks that run at once, + 1 (0: not asked yet)
    auto kernel_of = [](int c) { return c == 16 ? topk_kernel<16> : c == 8 ? topk_kernel<8> : topk_kernel<4>; };
    auto fits = [&](int c) {
        if (!fit[c]) fit[c] = cluster_fit(kernel_of(c), dim3(1, c), dim3(kTopkThreads), 0) + 1;
        return fit[c] - 1;
    };
    const bool decode = n_tok <= 16;
    const int64_t regs = kTopkThreads * kTopkRegs;
    int c = cluster;
    if (c == 0) {
        c = decode ? (score_stride > 8192 ? 16 : 1) : 1;
        while (!decode && c < 16 && score_stride > regs * c) c = c == 1 ? 4 : 2 * c;
    }
    for (; c > 1; c = c == 4 ? 1 : c / 2) {
        const int f = fits(c);
        if (f > 0 && (cluster || !decode || n_tok <= f || score_stride > regs * (c / 2))) break;
    }
    return launch_cluster(dim3(1, c), c > 1 ? kernel_of(c) : topk_kernel<1>, dim3((unsigned)n_tok, c),
                          dim3(kTopkThreads), 0, s, sel, scores, score_stride, n_vis, k);
}
