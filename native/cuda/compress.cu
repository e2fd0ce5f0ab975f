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

// The same scores for f16 keys (faithful numerics) on tensor cores: mma m16n8k16 forms the head x key dots in f32,
// 16 heads of the query as the A fragments (ldmatrix from shared memory), 8 keys as the B fragments (registers).
// The query's heads are f16 high and low parts (split_f16, scaled per head by a power of two: ~22 bits; the FP4
// path's values are exact in the high part, and the low parts' products are then skipped); the scale 2^e rides in
// the head's weight (relu(2^e x) = 2^e relu(x), exactly). Heads past n_head are zero queries of weight 0. The dims
// of each 32-dim chunk are taken in an order of our own, the same for keys and query, such that a lane's B
// fragments of two k-steps are one 16-byte load of its key (dims 32 c + 8 j ..): the staged query holds dim 32 c +
// 8 j + 2 m + b at 32 c + 8 m + 2 j + b. Two kernels share this arithmetic, so a key's score has the same bits in
// both: indexer_score_tc_kernel for a decode step's few tokens, indexer_score_mm_kernel for a prefill chunk's many.
constexpr int kTcPitch = 136;  // halves per staged head: 272 bytes, ldmatrix's 8 rows free of bank conflicts
constexpr int kTcHeads = 64;   // at most
constexpr int kTcPart = kTcHeads * kTcPitch * 2;  // bytes of one staged part (high or low)

// Where dims 4 l .. 4 l + 3 of a head go in the staged order: two pairs, at this offset (halves) and 8 past it.
__device__ __forceinline__ int staged_at(int lane) {
    return 32 * (lane >> 3) + 16 * (lane & 1) + 2 * ((lane & 7) >> 1);
}

// A head's query split for the products, each lane holding dims 4 l .. 4 l + 3 (v): scaled by 2^-e (e from the
// head's largest magnitude over the warp), its f16 high and low parts stored in the staged order at hi and lo (two
// pairs, at staged_at(l) and 8 past it: both pointers already there); lo_used is set where a low part is not zero.
// Returns e.
__device__ __forceinline__ int split_head(float4 v, __half* hi, __half* lo, bool& lo_used) {
    const float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    const int e = f16_scale_exp(warp_max(amax));
    const float inv = pow2f(-e), f[4] = {v.x, v.y, v.z, v.w};
    __half h[4], l[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        split_f16(f[k] * inv, h[k], l[k]);
        lo_used |= __half2float(l[k]) != 0.0f;
    }
    *(uint32_t*)hi = *(const uint32_t*)h, *(uint32_t*)(hi + 8) = *(const uint32_t*)(h + 2);
    *(uint32_t*)lo = *(const uint32_t*)l, *(uint32_t*)(lo + 8) = *(const uint32_t*)(l + 2);
    return e;
}

// Chunk c of the B fragments of 8 keys from row r0 (key r0 + g; rows at or past n: copies of row n - 1, never
// stored): its two k-steps as one 16-byte load.
__device__ __forceinline__ void key_chunk(uint4& b, const __half* kb, int r0, int n, int c, int g, int j) {
    b = *(const uint4*)(kb + (int64_t)min(r0 + g, n - 1) * kIdxDim + 8 * j + 32 * c);
}
__device__ __forceinline__ void key_frags(uint4 (&b)[4], const __half* kb, int r0, int n, int g, int j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) key_chunk(b[c], kb, r0, n, c, g, j);
}

// The scores of NT x 8 keys (b: their B fragments) over the 64 staged heads (hi: the high parts' shared address;
// with LO also lo, the low parts'). Each head x key product takes the k-steps in order, each high part then low;
// done(c) runs once chunk c of b is used (the next keys' loads). For each key the lane's 8 heads (16 mt + g + 8 h)
// are summed in that order, then the quad rows' partial sums pairwise over lanes g ^ 4, g ^ 2, g ^ 1. Lane (g, j)
// ends with key 8 (k >> 1) + 2 j + (k & 1) of the NT x 8, k = g (NT 4) or g >> 1 (NT 2: lanes g and g ^ 1 alike);
// returned.
template <int NT, bool LO, typename Done>
__device__ __forceinline__ float score_keys(const uint4 (&b)[NT][4], uint32_t hi, uint32_t lo, const float* hw,
                                            int lane, Done done) {
    const int g = lane >> 2;
    const uint32_t at = ((lane & 7) + 8 * ((lane >> 3) & 1)) * kTcPitch * 2 + 16 * (lane >> 4);
    float acc[4][NT][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int part = 0; part < (LO ? 2 : 1); ++part) {
                uint32_t a[4];
                ldmatrix_x4(a, (part ? lo : hi) + at + mt * 16 * kTcPitch * 2 + 32 * kk);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const uint4 q = b[nt][kk >> 1];
                    const uint32_t bf[2] = {kk & 1 ? q.z : q.x, kk & 1 ? q.w : q.y};
                    mma_f16(acc[mt][nt], a, bf);
                }
            }
        if (kk & 1) done(kk >> 1);
    }
    float v[2 * NT];
#pragma unroll
    for (int k = 0; k < 2 * NT; ++k) {
        float s = 0.0f;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                s = fmaf(hw[16 * mt + g + 8 * h], fmaxf(acc[mt][k >> 1][2 * h + (k & 1)], 0.0f), s);
        v[k] = s;
    }
    int n = 2 * NT;
#pragma unroll
    for (int mask = 16; mask >= 4; mask >>= 1) {
        if (n == 1) {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], mask);
            continue;
        }
        n /= 2;
        const bool up = lane & mask;
#pragma unroll
        for (int i = 0; i < n; ++i) {
            const float keep = up ? v[i + n] : v[i], send = up ? v[i] : v[i + n];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
        }
    }
    return v[0];
}

// Decode: a block takes row tiles blockIdx.x, + gridDim.x, ... of its one token (blockIdx.y), the query staged once
// and the next tile's fragments loaded while this one's products run (at 256K keys a block per tile staged the
// query 2,048 times: 60 us for 16 us of key bytes). Each warp takes 16 keys of a tile.
constexpr int kTcWarps = 8;
__global__ void __launch_bounds__(32 * kTcWarps, 16 / kTcWarps)
    indexer_score_tc_kernel(float* scores, int64_t score_stride, const float* q, const float* w, float w_scale,
                            const void* const* keys, const int32_t* n_vis, int n_head, int top_k) {
    constexpr int kHpw = kTcHeads / kTcWarps, kTile = 16 * kTcWarps;  // heads per warp, keys per tile
    extern __shared__ __align__(16) uint8_t qsm[];
    __half* qhi = (__half*)qsm;                   // kTcHeads x kTcPitch
    __half* qlo = (__half*)(qsm + kTcPart);       // the same
    float* hw = (float*)(qsm + 2 * kTcPart);      // w_h * w_scale * 2^e, 0 past n_head
    pdl_trigger();
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, j = lane & 3;
    const int c_first = blockIdx.x * kTile, t = blockIdx.y, n = n_vis[t];
    if (n <= top_k || c_first >= n) return;
    float4 qv[kHpw];
#pragma unroll
    for (int i = 0; i < kHpw; ++i) {  // all loads in flight together (one at a time, each head's weight cost ~0.6 us)
        const int h = warp + kTcWarps * i;
        qv[i] = h < n_head ? ((const float4*)(q + ((int64_t)t * n_head + h) * kIdxDim))[lane]
                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const int hl = warp + kTcWarps * lane;  // lane i < kHpw: the weight of the warp's i-th head
    const float wl = lane < kHpw && hl < n_head ? w[(int64_t)t * n_head + hl] * w_scale : 0.0f;
    const __half* kp = (const __half*)keys[t];
    uint4 b[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) key_frags(b[nt], kp, c_first + 16 * warp + 8 * nt, n, g, j);
    bool lo_used = false;
#pragma unroll
    for (int i = 0; i < kHpw; ++i) {
        const int h = warp + kTcWarps * i;
        const int at = h * kTcPitch + staged_at(lane);
        const int e = split_head(qv[i], qhi + at, qlo + at, lo_used);
        const float wh = __shfl_sync(0xffffffffu, wl, i);
        if (lane == 0) hw[h] = wh * pow2f(e);
    }
    lo_used = __syncthreads_or(lo_used);  // not in the FP4 path's queries: half the products and loads
    // The next tile's fragments are loaded as soon as this one's products are issued, and the tile after it is
    // brought into L2 (lane l: half l / 16 of row l % 16 of the warp's 16).
    auto to_l2 = [&](int c) {
        const int r = c + 16 * warp + (lane & 15);
        if (r < n)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(kp + (int64_t)r * kIdxDim + (lane >> 4) * (kIdxDim / 2)));
    };
    to_l2(c_first + gridDim.x * kTile);
    float* out = scores + (int64_t)t * score_stride;
    for (int c0 = c_first;;) {
        const int c_next = c0 + gridDim.x * kTile;
        to_l2(c_next + gridDim.x * kTile);
        auto next = [&](int c) {  // chunk c of the next tile's keys
            if (c_next < n) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) key_chunk(b[nt][c], kp, c_next + 16 * warp + 8 * nt, n, c, g, j);
            }
        };
        const float s = lo_used ? score_keys<2, true>(b, smem_addr(qhi), smem_addr(qlo), hw, lane, next)
                                : score_keys<2, false>(b, smem_addr(qhi), 0, hw, lane, next);
        const int row = c0 + 16 * warp + 8 * (g >> 2) + 2 * j + ((g >> 1) & 1);
        if (!(g & 1) && row < n) out[row] = s + 0.0f;  // -0 -> +0: one key per value
        if (c_next >= n) break;
        c0 = c_next;
    }
}

// Prefill: each token's query split once, by indexer_split_kernel, into a work area (IdxWork): the heads' f16 high
// and low parts (n_tok x 64 x 128 each, in the staged order, zero past n_head), their weights w_h * w_scale * 2^e
// (n_tok x 64) and a flag per token: any low part nonzero.
struct IdxWork {
    __half *hi, *lo;
    float* hw;
    int32_t* lo_used;
    IdxWork(void* work, int n_tok)
        : hi((__half*)work), lo(hi + (size_t)n_tok * kTcHeads * kIdxDim),
          hw((float*)(lo + (size_t)n_tok * kTcHeads * kIdxDim)), lo_used((int32_t*)(hw + (size_t)n_tok * kTcHeads)) {}
    static size_t bytes(int n_tok) { return (size_t)n_tok * (2 * kTcHeads * kIdxDim * 2 + kTcHeads * 4 + 4); }
};

// One block per token, warp w splitting heads w, w + 8, ... as indexer_score_tc_kernel does.
__global__ void __launch_bounds__(256) indexer_split_kernel(IdxWork wk, const float* q, const float* w, float w_scale,
                                                            int n_head) {
    pdl_trigger();
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.x;
    bool lo_used = false;
    for (int h = warp; h < kTcHeads; h += 8) {
        const float4 v = h < n_head ? ((const float4*)(q + ((int64_t)t * n_head + h) * kIdxDim))[lane]
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const int64_t at = ((int64_t)t * kTcHeads + h) * kIdxDim + staged_at(lane);
        const int e = split_head(v, wk.hi + at, wk.lo + at, lo_used);
        if (lane == 0) wk.hw[t * kTcHeads + h] = h < n_head ? w[(int64_t)t * n_head + h] * w_scale * pow2f(e) : 0.0f;
    }
    lo_used = __syncthreads_or(lo_used);
    if (threadIdx.x == 0) wk.lo_used[t] = lo_used;
}

// A block takes one tile of kMmKeys keys (each warp 32 of them, their fragments in registers) for up to
// tok_per_block tokens, whose split queries pass through two shared-memory stages by cp.async (the low parts only
// where a token has them), one barrier per token. The keys are loaded again only for another session's rows; a run
// of one session's tokens loads rows up to the most any of them sees.
constexpr int kMmWarps = 8, kMmKeys = 32 * kMmWarps;
constexpr int kMmStage = 2 * kTcPart + kTcHeads * 4;  // bytes: the high and low parts, then the head weights

__global__ void __launch_bounds__(32 * kMmWarps, 1)
    indexer_score_mm_kernel(float* scores, int64_t score_stride, IdxWork wk, const void* const* keys,
                            const int32_t* n_vis, int n_tok, int top_k, int tok_per_block) {
    extern __shared__ __align__(16) uint8_t ring[];
    pdl_trigger();
    pdl_wait();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, j = lane & 3;
    const int c_first = blockIdx.x * kMmKeys, t0 = blockIdx.y * tok_per_block;
    const int t_end = min(n_tok, t0 + tok_per_block);
    auto live = [&](int t) {
        const int n = n_vis[t];
        return n > top_k && c_first < n;
    };
    if (!__syncthreads_or(threadIdx.x < t_end - t0 && live(t0 + threadIdx.x))) return;
    auto stage = [&](int t) {  // token t's parts and head weights into its stage (nothing for a token not live)
        if (t < t_end && live(t)) {
            uint8_t* st = ring + (t - t0) % 2 * kMmStage;
            const int parts = wk.lo_used[t] ? 2 : 1;
            for (int i = threadIdx.x; i < parts * kTcHeads * kIdxDim / 8; i += blockDim.x) {
                const int part = i >> 10, h = (i >> 4) & 63, p = i & 15;
                cp_async16(st + part * kTcPart + h * kTcPitch * 2 + 16 * p,
                           (part ? wk.lo : wk.hi) + ((int64_t)t * kTcHeads + h) * kIdxDim + 8 * p);
            }
            if (threadIdx.x < kTcHeads / 4)
                cp_async16(st + 2 * kTcPart + 16 * threadIdx.x, wk.hw + t * kTcHeads + 4 * threadIdx.x);
        }
        cp_async_commit();  // an empty group where nothing was copied keeps the wait count uniform
    };
    uint4 b[4][4];  // the warp's 4 x 8 keys' fragments
    const void* loaded = nullptr;
    int n_loaded = 0;
    stage(t0);
    for (int t = t0; t < t_end; ++t) {
        cp_async_wait<0>();
        __syncthreads();  // token t's stage is in, and every warp is done with the stage that t + 1 takes
        stage(t + 1);
        if (!live(t)) continue;
        const void* kp = keys[t];
        const int n = n_vis[t];
        if (kp != loaded || (n > n_loaded && c_first + kMmKeys > n_loaded)) {
            n_loaded = n;  // the most that this session's tokens of the block see
            for (int u = t + 1; u < t_end && keys[u] == kp; ++u) n_loaded = max(n_loaded, n_vis[u]);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
                key_frags(b[nt], (const __half*)kp, c_first + 32 * warp + 8 * nt, n_loaded, g, j);
            loaded = kp;
        }
        const uint8_t* st = ring + (t - t0) % 2 * kMmStage;
        const uint32_t hi = smem_addr(st);
        const float* hw = (const float*)(st + 2 * kTcPart);
        auto none = [](int) {};
        const float s = wk.lo_used[t] ? score_keys<4, true>(b, hi, hi + kTcPart, hw, lane, none)
                                      : score_keys<4, false>(b, hi, 0, hw, lane, none);
        const int row = c_first + 32 * warp + 8 * (g >> 1) + 2 * j + (g & 1);
        if (row < n) scores[(int64_t)t * score_stride + row] = s + 0.0f;  // -0 -> +0: one key per value
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

// Where the prefill kernel serves: more than 16 tokens (the engine's decode batches hold at most 16 by default; a
// larger one of sessions alone is right there too, each token loading its keys) of f16 rows and at most 64 heads.
static bool indexer_prefill(int n_tok, int n_head, bool f32_rows) {
    return n_tok > 16 && n_head <= kTcHeads && !f32_rows;
}

size_t ds4_cuda_indexer_scores_work_bytes(int n_tok, int n_head, bool f32_rows) {
    return n_tok > 0 && indexer_prefill(n_tok, n_head, f32_rows) ? IdxWork::bytes(n_tok) : 0;
}

cudaError_t ds4_cuda_indexer_scores(cudaStream_t s, float* scores, int64_t score_stride, const float* q,
                                    const float* w, float w_scale, const void* const* keys, const int32_t* n_vis,
                                    int n_tok, int n_head, int dim, int cap, int top_k, bool f32_rows, void* work) {
    clear_error();
    if (dim != kIdxDim || n_tok < 1 || n_tok > 65535 || n_head < 1 || cap < 1 || score_stride < cap || !keys ||
        !n_vis || (uintptr_t)q % 16)
        return invalid("indexer_scores: needs dim 128, 1 <= n_tok <= 65535, n_head >= 1, cap <= score_stride, q "
                       "16-byte aligned");
    if (indexer_prefill(n_tok, n_head, f32_rows)) {
        // Prefill: the queries split once, then tiles of 256 keys, each block's for up to 64 tokens (fewer where
        // that leaves the device under two rounds of blocks).
        if (!work || (uintptr_t)work % 16)
            return invalid("indexer_scores: needs a 16-byte aligned work area of indexer_scores_work_bytes");
        const IdxWork wk(work, n_tok);
        cudaError_t e = launch(indexer_split_kernel, dim3((unsigned)n_tok), dim3(256), 0, s, wk, q, w, w_scale,
                               n_head);
        if (e != cudaSuccess) return e;
        const size_t smem = 2 * kMmStage;
        if ((e = allow_smem(indexer_score_mm_kernel, smem)) != cudaSuccess) return e;
        const int64_t gx = ceil_div(cap, kMmKeys);
        int tpb = 64;
        while (tpb > 8 && gx * ceil_div(n_tok, tpb) < 2 * props().sms) tpb /= 2;
        return launch(indexer_score_mm_kernel, dim3((unsigned)gx, (unsigned)ceil_div(n_tok, tpb)),
                      dim3(32 * kMmWarps), smem, s, scores, score_stride, wk, keys, n_vis, n_tok, top_k, tpb);
    }
    if (!f32_rows && n_head <= kTcHeads && cap > 1024) {
        // Decode: tiles of 128 keys, at most as many blocks per token as run at once over the tokens (16K keys: 128
        // blocks of one tile). Over at most 1,024 keys the FMA kernel: its chain is shorter (H200, one token: 4.9
        // against 6.4 us at 514 keys, 9.7 against 6.5 at 4,096).
        auto kernel = indexer_score_tc_kernel;
        const size_t smem = 2 * kTcPart + kTcHeads * sizeof(float);
        cudaError_t e = allow_smem(kernel, smem);
        if (e != cudaSuccess) return e;
        const int threads = 32 * kTcWarps;
        const int64_t gx = std::min<int64_t>(ceil_div(cap, 16 * kTcWarps),
                                             std::max(1, resident_blocks(kernel, threads, smem) / n_tok));
        return launch(kernel, dim3((unsigned)gx, (unsigned)n_tok), dim3(threads), smem, s, scores, score_stride, q, w,
                      w_scale, keys, n_vis, n_head, top_k);
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
