// Decode attention: one query token per session against its raw window and (selected) compressed rows, 64 heads
// sharing one K = V row per position (MODEL.md 3.4 step 8), with a per-head sink in the softmax denominator.
//
// Split rows ("flash decoding") in two launches. With f16 rows and the shared memory for it (Hopper), the first is
// the tensor-core kernel below: one block per (token, 16 heads, 32 consecutive rows of the token's row list),
// leaving that tile's max, sum of exponentials and unnormalized output in scratch. Otherwise
// (f32 rows for exact numerics; GPUs with less shared memory) it gives each block 32 consecutive rows of one token's
// row list (raw rows first, then compressed rows in list order) and 4 heads: it stages the f16 rows and the 4
// query vectors in shared memory, each warp scores one head (lane i: row i), takes the split's max and sum of
// exponentials, and accumulates its p-weighted rows (lane i: dims 16 i .. 16 i + 15 at dim 512) into a partial
// result in scratch. The second combines the splits of each (token, head) with the sink (a combine folded into the
// last block of each split group measured slower: its serial tail outweighed the saved launch). Row counts come
// from device memory: the grid covers the capacity, and blocks past a token's rows do nothing. Each token's rows
// live at a fixed stride from one base, or where its entry of a per-token table of row arrays says (the sessions
// of a batch have separate buffers; a prefill token's window is a range of a staging array). f32 arithmetic
// throughout (f16 rows convert exactly). Prefill's many query tokens with f16 rows take one launch of their own
// (the last kernel below).
#include "common.cuh"
#include "numerics.cuh"

namespace ds4::cuda {
namespace {

constexpr int kRows = 32;       // rows per split
constexpr int kHeads = 4;       // heads per block (one per warp): more blocks in flight than with 8

struct AttnArgs {
    float* out;
    float* part;  // (n_tok, n_head, n_split, dim + 4): m, l, 2 pad, o[dim]
    const float* q;
    const uint8_t* raw;
    int64_t raw_stride;                // elements
    const uint8_t* const* raw_rows;    // per-token row arrays (null: raw + t * raw_stride)
    const int32_t* raw_n;
    int raw_cap;
    const uint8_t* comp;
    int64_t comp_stride;
    const uint8_t* const* comp_rows;   // likewise for the compressed rows
    const int32_t* comp_n;
    int comp_cap;
    const int32_t* sel;
    int sel_cap;
    const float* sinks;
    int n_head, dim, n_split;
    int tiles;  // row tiles per split past the raw window's (split_first)
    float scale;
    const int32_t* rope_pos;  // decode's combine: the inverse RoPE of each head's last n_rot dims (null: none)
    const double* rope_freq;
    int n_rot;
    // The decode front (null kv_x: none): q before its norm and RoPE, each token's K=V row before its norm, RoPE and
    // FP8 round trip of the first n_nope dims; the split launch forms both and stores the row (its ring slot).
    const float* kv_x;
    const float* kv_w;
    float eps;
    int n_nope;
    // The combine's output also as Q8_0 activations (null xq: none), laid out as ds4_cuda_matvec's workspace for a
    // product of n_tok rows in column groups of xq_heads heads (group g's rows at xq + g * xq_group_bytes).
    uint8_t* xq;
    int64_t xq_group_bytes;
    int xq_heads;
};

// Decode's splits of a token's rows: the first ceil(raw_cap / kRows) take a row tile each (the raw window's: the
// decode front forms the new row in its tile), each later one `tiles` tiles (for long lists of compressed rows:
// fewer, fuller blocks and partial results). Split z covers tiles split_first(z) .. split_first(z + 1) - 1.
__host__ __device__ inline int split_first(int z, int raw_cap, int tiles) {
    const int r = (raw_cap + kRows - 1) / kRows;  // 32-bit: a 64-bit division is a call with a stack frame
    return z <= r ? z : r + (z - r) * tiles;
}
__host__ __device__ inline int split_count(int rows, int raw_cap, int tiles) {
    const int n = (rows + kRows - 1) / kRows, r = (raw_cap + kRows - 1) / kRows;
    return n <= r ? n : r + (n - r + tiles - 1) / tiles;
}

// Rows of token t: raw rows, then compressed candidates (the selection list's entries, or every row).
__device__ __forceinline__ int row_count(const AttnArgs& a, int t, int& n_raw) {
    n_raw = min(max(a.raw_n[t], 0), a.raw_cap);
    const int n_comp = a.sel ? a.sel_cap : min(max(a.comp_n[t], 0), a.comp_cap);
    return n_raw + n_comp;
}

// Eight consecutive values i*8 .. i*8+7 of a staged row of R (f16 or f32) as floats.
template <typename R>
__device__ __forceinline__ void row8(const uint8_t* kr, int i, float (&k)[8]) {
    if constexpr (sizeof(R) == 2) {
        const uint4 raw = *(const uint4*)(kr + 16 * i);
        const float2 k0 = __half22float2(*(const __half2*)&raw.x), k1 = __half22float2(*(const __half2*)&raw.y);
        const float2 k2 = __half22float2(*(const __half2*)&raw.z), k3 = __half22float2(*(const __half2*)&raw.w);
        k[0] = k0.x, k[1] = k0.y, k[2] = k1.x, k[3] = k1.y, k[4] = k2.x, k[5] = k2.y, k[6] = k3.x, k[7] = k3.y;
    } else {
        const float4 a = *(const float4*)(kr + 32 * i), b = *(const float4*)(kr + 32 * i + 16);
        k[0] = a.x, k[1] = a.y, k[2] = a.z, k[3] = a.w, k[4] = b.x, k[5] = b.y, k[6] = b.z, k[7] = b.w;
    }
}

// Token t's row list (row_count's n_raw and total): where its entry v lies (null: none), a raw row or the compressed
// row its list entry names. ES: the rows' element size, D their length. The token's addresses loaded once, for the
// prefill kernel, which walks all of a token's tiles: with row_src in their place it took 5% longer (128 registers
// instead of 122; H200, 8K prompt in chunks of 2048, 2026-11-29).
template <int ES, int D>
struct RowList {
    static constexpr int64_t kRow = (int64_t)ES * D;
    const uint8_t *raw, *comp;
    const int32_t* sel;  // token t's selection (null: every compressed row)
    int n_raw, total, n_comp;
    __device__ __forceinline__ RowList(const AttnArgs& a, int t, int n_raw_, int total_)
        : raw(a.raw_rows ? a.raw_rows[t] : a.raw + (int64_t)t * a.raw_stride * ES),
          comp(a.comp_rows ? a.comp_rows[t] : a.comp + (int64_t)t * a.comp_stride * ES),
          sel(a.sel ? a.sel + (int64_t)t * a.sel_cap : nullptr), n_raw(n_raw_), total(total_),
          n_comp(min(a.comp_n[t], a.comp_cap)) {}
    __device__ __forceinline__ const uint8_t* src(int v) const {
        if (v < n_raw) return raw + v * kRow;
        if (v >= total) return nullptr;
        const int c = sel ? sel[v - n_raw] : v - n_raw;
        return c < 0 || c >= n_comp ? nullptr : comp + c * kRow;
    }
};
// One entry of the list, each address loaded only where that entry needs it: the decode kernels' (a tile or a few
// per block; built on RowList, their SASS changed, untimed).
template <int ES, int D>
__device__ __forceinline__ const uint8_t* row_src(const AttnArgs& a, int t, int v, int n_raw, int total) {
    constexpr int64_t kRow = (int64_t)ES * D;
    if (v < n_raw) return (a.raw_rows ? a.raw_rows[t] : a.raw + (int64_t)t * a.raw_stride * ES) + v * kRow;
    if (v >= total) return nullptr;
    const int c = a.sel ? a.sel[(int64_t)t * a.sel_cap + (v - n_raw)] : v - n_raw;
    if (c < 0 || c >= min(a.comp_n[t], a.comp_cap)) return nullptr;
    return (a.comp_rows ? a.comp_rows[t] : a.comp + (int64_t)t * a.comp_stride * ES) + c * kRow;
}

// R: the row type, f16 (faithful numerics) or f32 (exact numerics keep the CPU's f32 rows).
template <int DL, typename R>
__global__ void __launch_bounds__(32 * kHeads, 4) attention_split_kernel(AttnArgs a) {
    constexpr int D = 32 * DL;
    constexpr int kRowBytes = (int)sizeof(R) * D + 16;  // padded: lanes reading a column of consecutive rows
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t* krows = smem;
    float* qs = (float*)(smem + kRows * kRowBytes);
    float* ps = qs + kHeads * D;
    int* valid = (int*)(ps + kHeads * kRows);
    pdl_trigger();
    pdl_wait();

    const int t = blockIdx.z, h0 = blockIdx.y * kHeads, v0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n_raw;
    const int total = row_count(a, t, n_raw);
    if (v0 >= total) return;

    // Each of the split's rows: where it lives, or null.
    __shared__ const uint8_t* src_row[kRows];
    if (threadIdx.x < kRows) {
        const uint8_t* src = row_src<sizeof(R), D>(a, t, v0 + threadIdx.x, n_raw, total);
        src_row[threadIdx.x] = src;
        valid[threadIdx.x] = src != nullptr;
    }
    __syncthreads();
    // Stage the rows (16-byte pieces) and the block's query vectors.
    constexpr int kPieces = (int)sizeof(R) * D / 16;
    for (int i = threadIdx.x; i < kRows * kPieces; i += blockDim.x) {
        const int r = i / kPieces, pc = i - r * kPieces;
        if (src_row[r]) cp_async16(krows + r * kRowBytes + 16 * pc, src_row[r] + 16 * pc);
    }
    for (int i = threadIdx.x; i < kHeads * D / 4; i += blockDim.x) {
        const int hh = i / (D / 4), pc = i - hh * (D / 4);
        if (h0 + hh < a.n_head) cp_async16(qs + hh * D + 4 * pc, a.q + ((int64_t)t * a.n_head + h0 + hh) * D + 4 * pc);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int h = h0 + warp;
    const bool live = h < a.n_head;
    // Scores: lane = row.
    float s = -INFINITY;
    if (live && valid[lane]) {
        const uint8_t* kr = krows + lane * kRowBytes;
        const float* qh = qs + warp * D;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;  // four chains: the FMA latency is not the limit
#pragma unroll 8
        for (int pc = 0; pc < D / 8; ++pc) {
            float k[8];
            row8<R>(kr, pc, k);
            const float4 qa = *(const float4*)(qh + 8 * pc), qb = *(const float4*)(qh + 8 * pc + 4);
            s0 = fmaf(qa.x, k[0], s0), s1 = fmaf(qa.y, k[1], s1);
            s2 = fmaf(qa.z, k[2], s2), s3 = fmaf(qa.w, k[3], s3);
            s0 = fmaf(qb.x, k[4], s0), s1 = fmaf(qb.y, k[5], s1);
            s2 = fmaf(qb.z, k[6], s2), s3 = fmaf(qb.w, k[7], s3);
        }
        s = ((s0 + s1) + (s2 + s3)) * a.scale;
    }
    const float m = warp_max(s);
    const float p = s == -INFINITY ? 0.0f : expf(s - m);
    const float l = warp_sum(p);
    ps[warp * kRows + lane] = p;
    __syncwarp();

    // Weighted rows: lane = DL consecutive dims.
    float o[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) o[i] = 0.0f;
    for (int r = 0; r < kRows; ++r) {
        const float pr = ps[warp * kRows + r];
        if (pr == 0.0f) continue;  // also skips rows never staged
        const uint8_t* kr = krows + r * kRowBytes + (int)sizeof(R) * DL * lane;
        if constexpr (sizeof(R) == 4) {
#pragma unroll
            for (int i = 0; i < DL; i += 4) {
                const float4 f = *(const float4*)(kr + 4 * i);
                o[i] = fmaf(pr, f.x, o[i]), o[i + 1] = fmaf(pr, f.y, o[i + 1]);
                o[i + 2] = fmaf(pr, f.z, o[i + 2]), o[i + 3] = fmaf(pr, f.w, o[i + 3]);
            }
            continue;
        }
        uint32_t w[DL / 2];
        if constexpr (DL == 4) {
            const uint2 raw = *(const uint2*)kr;
            w[0] = raw.x, w[1] = raw.y;
        } else {
#pragma unroll
            for (int i = 0; i < DL / 8; ++i) {
                const uint4 raw = *(const uint4*)(kr + 16 * i);
                w[4 * i] = raw.x, w[4 * i + 1] = raw.y, w[4 * i + 2] = raw.z, w[4 * i + 3] = raw.w;
            }
        }
#pragma unroll
        for (int k = 0; k < DL / 2; ++k) {
            const float2 f = __half22float2(*(const __half2*)&w[k]);
            o[2 * k] = fmaf(pr, f.x, o[2 * k]);
            o[2 * k + 1] = fmaf(pr, f.y, o[2 * k + 1]);
        }
    }
    if (!live) return;
    float* part = a.part + (((int64_t)t * a.n_head + h) * a.n_split + blockIdx.x) * (D + 4);
    if (lane == 0) part[0] = m, part[1] = l;
#pragma unroll
    for (int i = 0; i < DL; i += 4)
        *(float4*)(part + 4 + DL * lane + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
}

// One block per (head, token), a thread per 4 dims: M = max(sink, split maxima); out = sum_s e^(m_s - M) o_s /
// (e^(sink - M) + sum_s e^(m_s - M) l_s). The loads of the splits' (m, l) and of the thread's o pieces of the first
// kCombineAhead splits go out together (one trip to L2 where there are no more splits: 2K contexts have 4-20), then
// one barrier; every thread forms M, the weights and the denominator itself (in the order a single thread would)
// while it sums; later splits' o pieces are loaded kCombineBatch at a time. A token with no row at all gets 0 (only
// the sink). With xq, each 32 values also leave as a Q8_0 block (the block's 8 threads find its maximum in 3
// shuffles): the output projection's activations without a quantize launch before it.
constexpr int kCombineAhead = 24, kCombineBatch = 8;

__global__ void __launch_bounds__(128) attention_combine_kernel(AttnArgs a) {
    extern __shared__ float sw[];  // per split: m_s, then l_s
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x, t = blockIdx.y, stride = a.dim + 4, d = 4 * threadIdx.x;
    int n_raw;
    const int n_split = split_count(row_count(a, t, n_raw), a.raw_cap, a.tiles);
    const float* part = a.part + ((int64_t)t * a.n_head + h) * a.n_split * stride;
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) {
        sw[s] = part[s * stride];
        sw[n_split + s] = part[s * stride + 1];
    }
    const bool live = d < a.dim;
    float4 o[kCombineAhead];
#pragma unroll
    for (int k = 0; k < kCombineAhead; ++k)
        if (live && k < n_split) o[k] = *(const float4*)(part + k * stride + 4 + d);
    __syncthreads();
    if (!live) return;
    const float sink = a.sinks[h];
    float M = sink;
    for (int s = 0; s < n_split; ++s) M = fmaxf(M, sw[s]);
    float den = expf(sink - M);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    auto fold = [&](int s, const float4& v) {  // split s into the denominator and the sum (weight 0: no row)
        const float w = sw[s] == -INFINITY ? 0.0f : expf(sw[s] - M);
        den += w * sw[n_split + s];
        if (w == 0.0f) return;
        acc.x = fmaf(w, v.x, acc.x), acc.y = fmaf(w, v.y, acc.y);
        acc.z = fmaf(w, v.z, acc.z), acc.w = fmaf(w, v.w, acc.w);
    };
#pragma unroll
    for (int k = 0; k < kCombineAhead; ++k) {
        if (k >= n_split) break;
        fold(k, o[k]);
    }
    for (int s0 = kCombineAhead; s0 < n_split; s0 += kCombineBatch) {
        float4 ob[kCombineBatch];
#pragma unroll
        for (int k = 0; k < kCombineBatch; ++k)
            if (s0 + k < n_split) ob[k] = *(const float4*)(part + (s0 + k) * stride + 4 + d);
#pragma unroll
        for (int k = 0; k < kCombineBatch; ++k)
            if (s0 + k < n_split) fold(s0 + k, ob[k]);
    }
    const float inv_den = 1.0f / den;
    float4 r = make_float4(acc.x * inv_den, acc.y * inv_den, acc.z * inv_den, acc.w * inv_den);
    if (a.rope_pos && d >= a.dim - a.n_rot) {  // V's rotated tail back (rope_kernel's inverse, two pairs)
        const int j = (d - (a.dim - a.n_rot)) / 2;
        float c0, s0, c1, s1;
        rope_angle(a.rope_pos[t], a.rope_freq[j], c0, s0);
        rope_angle(a.rope_pos[t], a.rope_freq[j + 1], c1, s1);
        r = make_float4(r.x * c0 + r.y * s0, r.y * c0 - r.x * s0, r.z * c1 + r.w * s1, r.w * c1 - r.z * s1);
    }
    *(float4*)(a.out + ((int64_t)t * a.n_head + h) * a.dim + d) = r;
    if (a.xq) {  // dim <= 512: every thread of a warp that enters holds 4 values
        const float amax = group8_max(fmaxf(fmaxf(fabsf(r.x), fabsf(r.y)), fmaxf(fabsf(r.z), fabsf(r.w))));
        float dq;
        const float inv = q8_0_inv(amax, dq);
        const int64_t cols = (int64_t)a.xq_heads * a.dim, at = (int64_t)(h % a.xq_heads) * a.dim + d;
        uint8_t* base = a.xq + (h / a.xq_heads) * a.xq_group_bytes;
        const uint32_t q = ((uint32_t)q8_0_value(r.x, inv) & 255u) | ((uint32_t)q8_0_value(r.y, inv) & 255u) << 8 |
                           ((uint32_t)q8_0_value(r.z, inv) & 255u) << 16 | (uint32_t)q8_0_value(r.w, inv) << 24;
        *(uint32_t*)(base + t * cols + at) = q;
        if (d % 32 == 0) ((float*)(base + (int64_t)gridDim.y * cols))[t * (cols / 32) + at / 32] = dq;
    }
}

// ---- tensor cores: decode's splits -----------------------------------------------------------------------------
//
// One block per (token, 16 heads, split), 8 warps, f16 rows. The block walks its split's rows 32 at a time (the next
// tile's rows copied with cp.async while this one computes; rows with no source are zeros, their scores -inf):
// S = Q K^T with mma m16n8k16 (warp w: rows 8 (w % 4) .. + 7 over half w / 4 of the dims; the two halves meet in
// shared memory, added in order), an online softmax per head (warp w: heads 2 w, 2 w + 1; lane = row), then
// O += P V (warp w: dims w D / 8 .. + D / 8; V = the same rows, B fragments by ldmatrix.trans). Q and P are f32
// values split into two f16 parts (the high part and the rounding of the rest: ~22 bits; Q scaled per head by a
// power of two into f16's range), each product taken twice, so scores and sums stay within f32 rounding of the
// CUDA-core kernel's. Block z takes the tiles of split z (split_first) and leaves their (m, l, O) for
// attention_combine_kernel, as the CUDA-core split kernel does; many more blocks for a few queries, each row tile
// staged once per 16 heads instead of once per 4.
//
// FRONT (decode, split): the launch also does what rms_norm_rope and kv_store did before it, with their bits. The
// query heads are normed (no weight) and rotated as they are loaded; the token's new K=V row (raw row pos % raw_cap,
// its ring slot) is formed in each block whose tile holds it, warp w taking its 64-value block w (norm with kv_w,
// RoPE, the FP8 round trip below n_nope, f16; one warp forming the whole row made the launch as slow as the kernels
// it replaced), into the staged tile, and written to the ring by the first head group's block. The tile's other raw
// rows, which earlier steps wrote, are copied before the dependent-launch wait (the row counts, positions and row
// tables are the step's table, written before the step's first kernel); the compressed rows after it (the indexer's
// choice, a row emitted this step).
constexpr int kPfHeads = 16, kPfWarps = 8, kPfRows = 32, kPfPadP = 40;  // P rows padded: conflict-free A loads
static_assert(kPfRows == kRows, "a split is one row tile: the combine counts splits of kRows rows");

// A block's per-head values in shared memory (`heads` floats each, from `at`): the running output's correction for
// the tile, the final max and sum of exponentials, Q's power-of-two scale.
struct HeadVals {
    float *corr, *m_fin, *l_fin, *qscale;
};
__device__ __forceinline__ HeadVals head_vals(uint8_t* at, int heads) {
    float* c = (float*)at;
    return {c, c + heads, c + 2 * heads, c + 3 * heads};
}
// One online-softmax step of a head over a row tile, lane = row: its score s (-inf: no row) against the running max m
// and sum l (updated); the probability into P's two f16 parts ph, pl; returns the running output's correction.
__device__ __forceinline__ float softmax_step(float s, float& m, float& l, __half& ph, __half& pl) {
    const float m_new = fmaxf(m, warp_max(s));
    const float p = s == -INFINITY ? 0.0f : expf(s - m_new);
    const float c = m == -INFINITY ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m - m_new);
    l = l * c + warp_sum(p);
    m = m_new;
    split_f16(p, ph, pl);
    return c;
}
// A fragment (16 x 16 f16, row-major, `stride` halves apart) at column k0.
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const __half* base, int stride, int k0, int g, int t4) {
    const __half* p = base + g * stride + k0 + 2 * t4;
    a[0] = *(const uint32_t*)p;
    a[1] = *(const uint32_t*)(p + 8 * stride);
    a[2] = *(const uint32_t*)(p + 8);
    a[3] = *(const uint32_t*)(p + 8 * stride + 8);
}

// 1 / sqrt(mean(x^2) + eps) of an n-value row that a warp holds as N float4 per lane (the decode front's query heads
// and K=V row: the sum of squares in rms_norm_kernel's order for such a row, so the same reciprocal).
template <int N>
__device__ __forceinline__ float warp_rnorm(const float4* v, int n, float eps) {
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) ss = sumsq4(v[k], ss);
    return 1.0f / sqrtf(warp_sum(ss) / (float)n + eps);
}

template <int D>
struct PfSmem {
    static constexpr int kStride = D + 8;                          // halves per staged row (16 bytes of pad)
    static constexpr size_t q = 0;                                 // half [2][16][kStride]: Q high, low
    static constexpr size_t k = q + 2 * kPfHeads * kStride * 2;    // half [2][32][kStride]: row tiles
    static constexpr size_t sp = k + 2 * kPfRows * kStride * 2;    // float [2][16][32]: partial scores
    static constexpr size_t p = sp + 2 * kPfHeads * kPfRows * 4;   // half [2][16][kPfPadP]: P high, low
    static constexpr size_t misc = p + 2 * kPfHeads * kPfPadP * 2; // float corr[16], m[16], l[16], qscale[16]
    static constexpr size_t cs = misc + 4 * kPfHeads * 4;          // float [D]: FRONT's RoPE cos, sin
    static constexpr size_t bytes = cs + D * 4;
};

template <int D, bool FRONT>
__global__ void __launch_bounds__(32 * kPfWarps) attention_tc_kernel(AttnArgs a) {
    using S = PfSmem<D>;
    constexpr int ST = S::kStride, NT = D / 64;  // n8 tiles of dims per warp in O += P V
    constexpr int kVec = D / 128;                // float4 of a row per lane: elements 4 lane + 128 k
    extern __shared__ __align__(16) uint8_t smem[];
    __half* qs = (__half*)(smem + S::q);
    __half* ks = (__half*)(smem + S::k);
    float* sp = (float*)(smem + S::sp);
    __half* ps = (__half*)(smem + S::p);
    const auto [corr, m_fin, l_fin, qscale] = head_vals(smem + S::misc, kPfHeads);
    float* cs = (float*)(smem + S::cs);
    __shared__ const uint8_t* src_row[2][kPfRows];
    pdl_trigger();

    const int t = blockIdx.y, h0 = blockIdx.x * kPfHeads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    int n_raw = 0, total = 0, first = 0, n_tiles = 0, v_new = -1;

    // Row tile i into buffer b: sources (null: no row; zeros staged), then 16-byte copies. FRONT stages its tile in
    // two parts: kOld the raw rows but the new one, kNew the compressed rows (and the zeros).
    enum { kAll, kOld, kNew };
    auto stage = [&](int i, int b, int part) {
        if (threadIdx.x < kPfRows) {
            const int v = i * kPfRows + threadIdx.x;
            if (part != kNew || v >= n_raw)
                src_row[b][threadIdx.x] = part == kOld && v >= n_raw ? nullptr
                                                                     : row_src<2, D>(a, t, v, n_raw, total);
        }
        __syncthreads();
        constexpr int kPieces = 2 * D / 16;
        __half* dst = ks + b * kPfRows * ST;
        for (int j = threadIdx.x; j < kPfRows * kPieces; j += blockDim.x) {
            const int r = j / kPieces, pc = j - r * kPieces, v = i * kPfRows + r;
            if (part == kOld ? v >= n_raw || v == v_new : part == kNew && v < n_raw) continue;
            if (src_row[b][r]) cp_async16(dst + r * ST + 8 * pc, src_row[b][r] + 16 * pc);
            else *(uint4*)(dst + r * ST + 8 * pc) = make_uint4(0, 0, 0, 0);
        }
        cp_async_commit();
    };

    // FRONT: whether this tile holds the token's new K=V row (row r of it), and this warp's float4 of the row's
    // norm weight: warp w forms the row's 64-value block w (lanes 16 (w % 2) .. + 15, their float4 at k = w / 2).
    bool has_new = false;
    int r_new = 0;
    float4 kw{};
    if constexpr (FRONT) {
        total = row_count(a, t, n_raw);
        first = split_first(blockIdx.z, a.raw_cap, a.tiles);
        if (first * kPfRows >= total) return;  // past this token's rows (the grid covers the capacity)
        n_tiles = min((total + kPfRows - 1) / kPfRows, split_first(blockIdx.z + 1, a.raw_cap, a.tiles));
        const int pos = a.rope_pos[t], half = a.n_rot / 2;
        v_new = pos % a.raw_cap;
        r_new = v_new - first * kPfRows;
        has_new = r_new >= 0 && r_new < kPfRows;
        for (int j = threadIdx.x; j < half; j += blockDim.x) rope_angle(pos, a.rope_freq[j], cs[j], cs[half + j]);
        if (has_new && warp / 2 < kVec) kw = *(const float4*)(a.kv_w + 4 * lane + 128 * (warp / 2));
        stage(first, first & 1, kOld);
    }
    // A warm pass (one token, FRONT, where the launch waits behind the indexer's top-k): the query phase below runs
    // once before the dependency wait, on whatever q holds then, with its stores to shared memory only (the ring
    // slot and the compressed rows' copies wait for the real pass). Its ~1,250 instructions of straight-line code
    // are then in the SM's instruction caches when the wait ends; cold, they cost the chain 1-1.5 us more after it
    // (a layer's weight stream leaves L2 holding the code but the SM's caches not). The wait behind the top-k is long
    // enough to hide the pass; behind q_b (other layers, short contexts) or at several tokens it is not.
    const bool warm = FRONT && a.sel && gridDim.y == 1;
    float4 qv[2][kVec], kx[kVec];
#pragma unroll 1  // one copy of the code for both passes
    for (int pass = warm ? 0 : 1; pass < 2; ++pass) {
        const bool dry = pass == 0;
        if (!dry) pdl_wait();
        // The loads of the warp's two query heads and (FRONT) the new K=V row go out first, ahead of the row copies.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const bool live = h0 + 2 * warp + j < a.n_head;
            const float* qh = a.q + ((int64_t)t * a.n_head + h0 + 2 * warp + j) * D;
#pragma unroll
            for (int k = 0; k < kVec; ++k) qv[j][k] = live ? *(const float4*)(qh + 4 * lane + 128 * k) : float4{};
        }
        if constexpr (FRONT) {
            if (has_new)
#pragma unroll
                for (int k = 0; k < kVec; ++k) kx[k] = *(const float4*)(a.kv_x + (int64_t)t * D + 4 * lane + 128 * k);
            if (!dry) stage(first, first & 1, kNew);  // the compressed rows: the indexer's choice
        } else {
            total = row_count(a, t, n_raw);
            n_tiles = (total + kPfRows - 1) / kPfRows;
            first = split_first(blockIdx.z, a.raw_cap, a.tiles);
            if (first >= n_tiles) return;  // past this token's rows (the grid covers the capacity)
            n_tiles = min(n_tiles, split_first(blockIdx.z + 1, a.raw_cap, a.tiles));
        }

        // Q of the block's heads (zeros past n_head; FRONT: normed and rotated as rms_norm_rope does), split into f16
        // high and low parts per head scale.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int hh = 2 * warp + j;
            float4* v = qv[j];
            if constexpr (FRONT) {
                const float rn = warp_rnorm<kVec>(v, D, a.eps);
#pragma unroll
                for (int k = 0; k < kVec; ++k) v[k] = norm_rope4(v[k], rn, nullptr, 4 * lane + 128 * k, D, a.n_rot, cs);
            }
            float amax = 0.0f;
#pragma unroll
            for (int k = 0; k < kVec; ++k)
                amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[k].x), fabsf(v[k].y)), fmaxf(fabsf(v[k].z), fabsf(v[k].w))));
            amax = warp_max(amax);
            const int e = f16_scale_exp(amax);
            const float inv = pow2f(-e);
            if (lane == 0) qscale[hh] = pow2f(e);
#pragma unroll
            for (int k = 0; k < kVec; ++k) {  // four values' parts at a time: two 8-byte stores
                const int d = 4 * lane + 128 * k;
                __align__(8) __half hi[4], lo[4];
                split_f16(v[k].x * inv, hi[0], lo[0]), split_f16(v[k].y * inv, hi[1], lo[1]);
                split_f16(v[k].z * inv, hi[2], lo[2]), split_f16(v[k].w * inv, hi[3], lo[3]);
                *(uint2*)(qs + hh * ST + d) = *(const uint2*)hi;
                *(uint2*)(qs + (kPfHeads + hh) * ST + d) = *(const uint2*)lo;
            }
        }

        if (FRONT && has_new && warp < D / 64) {  // the token's new K=V row, as rms_norm_rope and kv_store form it
            const float inv_den = warp_rnorm<kVec>(kx, D, a.eps);
            float4 v{};
#pragma unroll
            for (int k = 0; k < kVec; ++k)
                if (k == warp / 2) v = kx[k];
            const int i = 4 * lane + 128 * (warp / 2);
            float4 o = norm_rope4(v, inv_den, &kw, i, D, a.n_rot, cs);
            float m = fmaxf(fmaxf(fabsf(o.x), fabsf(o.y)), fmaxf(fabsf(o.z), fabsf(o.w)));
#pragma unroll
            for (int sh = 8; sh > 0; sh >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, sh));  // the 64 values
            if ((lane >= 16) == (warp & 1)) {
                if (64 * warp < a.n_nope) {
                    const float scale = fp8_scale(m), inv = 1.0f / scale;  // exact: a power of two
                    o.x = e4m3_roundtrip(o.x, scale, inv), o.y = e4m3_roundtrip(o.y, scale, inv);
                    o.z = e4m3_roundtrip(o.z, scale, inv), o.w = e4m3_roundtrip(o.w, scale, inv);
                }
                const int b = first & 1;
                const __half2 h01 = __floats2half2_rn(o.x, o.y), h23 = __floats2half2_rn(o.z, o.w);
                const uint2 u = make_uint2(*(const uint32_t*)&h01, *(const uint32_t*)&h23);
                *(uint2*)(ks + (b * kPfRows + r_new) * ST + i) = u;
                // The first head group's block owns the ring slot this launch writes (src_row: its address).
                if (blockIdx.x == 0 && !dry) *(uint2*)(const_cast<uint8_t*>(src_row[b][r_new]) + 2 * i) = u;
            }
        }
    }

    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // heads 2 warp, 2 warp + 1
    float o[NT][4] = {};
    if (!FRONT && n_tiles > first) stage(first, first & 1, kAll);
    for (int i = first; i < n_tiles; ++i) {
        const int b = i & 1;
        cp_async_wait<0>();
        __syncthreads();
        if (i + 1 < n_tiles) stage(i + 1, b ^ 1, kAll);  // its barrier also orders this tile's zero-filled rows
        const __half* kt = ks + b * kPfRows * ST;

        {   // partial scores: rows 8 (warp % 4) .., dims half warp / 4
            const int nt = warp & 3, kh = warp >> 2;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
            for (int k0 = kh * (D / 2); k0 < (kh + 1) * (D / 2); k0 += 16) {
                uint32_t ahi[4], alo[4];
                frag_a(ahi, qs, ST, k0, g, t4);
                frag_a(alo, qs + kPfHeads * ST, ST, k0, g, t4);
                const __half* kr = kt + (8 * nt + g) * ST + k0 + 2 * t4;
                const uint32_t b0 = *(const uint32_t*)kr, b1 = *(const uint32_t*)(kr + 8);
                mma_f16(acc, ahi, {b0, b1});
                mma_f16(acc, alo, {b0, b1});
            }
            float* out = sp + kh * kPfHeads * kPfRows;
            const int r = 8 * nt + 2 * t4;
            out[g * kPfRows + r] = acc[0];
            out[g * kPfRows + r + 1] = acc[1];
            out[(g + 8) * kPfRows + r] = acc[2];
            out[(g + 8) * kPfRows + r + 1] = acc[3];
        }
        __syncthreads();
        // online softmax: warp w owns heads 2w, 2w + 1; lane = row of the tile
        for (int j = 0; j < 2; ++j) {
            const int hh = 2 * warp + j;
            const bool valid = src_row[b][lane] != nullptr;
            const float s = valid ? (sp[hh * kPfRows + lane] + sp[(kPfHeads + hh) * kPfRows + lane]) *
                                        qscale[hh] * a.scale
                                  : -INFINITY;
            const float c = softmax_step(s, m_run[j], l_run[j], ps[hh * kPfPadP + lane],
                                         ps[(kPfHeads + hh) * kPfPadP + lane]);
            if (lane == 0) corr[hh] = c;
        }
        __syncthreads();
        {   // O = O * corr + P V over dims warp * D / 8 ..
            const float c0 = corr[g], c1 = corr[g + 8];
#pragma unroll
            for (int j = 0; j < NT; ++j) o[j][0] *= c0, o[j][1] *= c0, o[j][2] *= c1, o[j][3] *= c1;
            const int d0 = warp * (D / 8);
#pragma unroll
            for (int r0 = 0; r0 < kPfRows; r0 += 16) {
                uint32_t phi[4], plo[4];
                frag_a(phi, ps, kPfPadP, r0, g, t4);
                frag_a(plo, ps + kPfHeads * kPfPadP, kPfPadP, r0, g, t4);
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    uint32_t b0, b1;
                    ldmatrix_x2_trans(b0, b1, smem_addr(kt + (r0 + (lane & 15)) * ST + d0 + 8 * j));
                    mma_f16(o[j], phi, {b0, b1});
                    mma_f16(o[j], plo, {b0, b1});
                }
            }
        }
    }
    if (lane == 0)
        for (int j = 0; j < 2; ++j) m_fin[2 * warp + j] = m_run[j], l_fin[2 * warp + j] = l_run[j];
    __syncthreads();
    const int d0 = warp * (D / 8);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int hh = g + 8 * half, h = h0 + hh;
        if (h >= a.n_head) continue;
        // the split's m, l and unnormalized O, laid out as the CUDA-core split kernel's
        float* part = a.part + (((int64_t)t * a.n_head + h) * a.n_split + blockIdx.z) * (D + 4);
        if (warp == 0 && t4 == 0) part[0] = m_fin[hh], part[1] = l_fin[hh];
#pragma unroll
        for (int j = 0; j < NT; ++j)
            *(float2*)(part + 4 + d0 + 8 * j + 2 * t4) = make_float2(o[j][2 * half], o[j][2 * half + 1]);
    }
}

template <int D, bool FRONT>
cudaError_t attention_tc_launch(cudaStream_t s, const AttnArgs& a, int n_tok) {
    const size_t smem = PfSmem<D>::bytes;
    cudaError_t e = allow_smem(attention_tc_kernel<D, FRONT>, smem);
    if (e != cudaSuccess) return e;
    return launch(attention_tc_kernel<D, FRONT>, dim3((unsigned)ceil_div(a.n_head, kPfHeads), n_tok, a.n_split),
                  dim3(32 * kPfWarps), smem, s, a);
}

// ---- tensor cores: prefill ---------------------------------------------------------------------------------------
//
// Many query tokens, f16 rows: one block per (token, 32 heads) walking all of the token's rows 32 at a time with an
// online softmax (no split, no scratch). A staged row tile serves 32 heads, twice the decode kernel's 16, and each
// warp keeps its part of Q in registers for the whole walk. With the dims in P parts the block has 2 P warps: warp w
// takes heads 16 (w / P) .. + 15 and dims part w % P, as mma A fragments (f16 high and low parts, each head scaled
// by a power of two), so its S = Q K^T is 8 mma per 16 dims with the rows' fragments by ldmatrix; the parts' partial
// scores meet in shared memory, added in order. Then the online softmax (32 / 2 P heads per warp; lane = row), P
// into two f16 parts, and O += P V (warp w: the same 16 heads, dims part w % P). Each warp stages its own rows of
// the next tile (no barrier for their addresses). With rope_pos the launch also does what rms_norm_rope did to q
// before it (norm without weight, RoPE) and the inverse RoPE of the output's tail after it. P = 8 (16 warps of 122
// registers at 512 dims) against P = 4 (8 warps of 214): 2,951 against 3,183 us for a 2K prompt's 4 layers (H200).
constexpr int kPrHeads = 32, kPrSpPad = kPfRows + 8;  // partial score rows padded: conflict-free float2 stores
constexpr int kPrParts = 8;                           // P

template <int D>
struct PrSmem {
    static constexpr int P = kPrParts, kStride = D + 8;              // kStride: halves per staged row (16 B of pad)
    static constexpr size_t k = 0;                                   // half [2][32][kStride]: row tiles
    static constexpr size_t sp = k + 2 * kPfRows * kStride * 2;      // float [P][32][kPrSpPad]: partial scores
    static constexpr size_t p = sp + P * kPrHeads * kPrSpPad * 4;    // half [2][32][kPfPadP]: P high, low
    static constexpr size_t misc = p + 2 * kPrHeads * kPfPadP * 2;   // float corr, m, l, qscale [32]; red [P][32]
    static constexpr size_t cs = misc + (4 + P) * kPrHeads * 4;      // float [D]: RoPE cos, sin
    static constexpr size_t bytes = cs + D * 4;
};
__device__ __forceinline__ uint32_t pack_f16(__half lo, __half hi) {
    return (uint32_t)__half_as_ushort(lo) | (uint32_t)__half_as_ushort(hi) << 16;
}

template <int D>
__global__ void __launch_bounds__(64 * kPrParts, 1) attention_prefill_kernel(AttnArgs a) {
    constexpr int P = kPrParts;
    using S = PrSmem<D>;
    constexpr int kWarps = 2 * P, kHw = kPrHeads / kWarps;      // warps, softmax heads per warp
    constexpr int ST = S::kStride, KD = D / P, KS = KD / 16, NO = KD / 8;  // a part: dims, k steps, n8 tiles
    static_assert(KS >= 1 && NO % 2 == 0 && kHw >= 1, "dims parts of at least 16");
    extern __shared__ __align__(16) uint8_t smem[];
    __half* ks = (__half*)(smem + S::k);
    float* sp = (float*)(smem + S::sp);
    __half* ps = (__half*)(smem + S::p);
    const auto [corr, m_fin, l_fin, qscale] = head_vals(smem + S::misc, kPrHeads);
    float* red = qscale + kPrHeads;  // [P][32]: the parts' sums of squares, then their largest magnitudes
    float* cs = (float*)(smem + S::cs);
    __shared__ int row_ok[2][kPfRows];
    pdl_trigger();
    pdl_wait();

    const int t = blockIdx.y, h0 = blockIdx.x * kPrHeads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int mt = warp / P, kq = warp % P;  // heads 16 mt .. + 15 (local), dims kq KD .. + KD - 1
    int n_raw;
    const int total = row_count(a, t, n_raw), n_tiles = (total + kPfRows - 1) / kPfRows;
    const RowList<2, D> rows(a, t, n_raw, total);
    const int half_rot = a.rope_pos ? a.n_rot / 2 : 0;
    for (int j = threadIdx.x; j < half_rot; j += blockDim.x)
        rope_angle(a.rope_pos[t], a.rope_freq[j], cs[j], cs[half_rot + j]);

    // Row tile i into buffer b, warp w its rows w, w + 2 P, ..: 16-byte copies, zeros where there is no row.
    auto stage = [&](int i, int b) {
        constexpr int kPieces = 2 * D / 16;
        for (int r = warp; r < kPfRows; r += kWarps) {
            const uint8_t* src = rows.src(i * kPfRows + r);
            __half* dst = ks + (b * kPfRows + r) * ST;
            if (lane == 0) row_ok[b][r] = src != nullptr;
            for (int pc = lane; pc < kPieces; pc += 32) {
                if (src) cp_async16(dst + 8 * pc, src + 16 * pc);
                else *(uint4*)(dst + 8 * pc) = make_uint4(0, 0, 0, 0);
            }
        }
        cp_async_commit();
    };
    if (n_tiles > 0) stage(0, 0);

    // This warp's Q: heads hA = 16 mt + g and hA + 8, dims k0 + 2 t4 (+1) and k0 + 8 + 2 t4 (+1) of each k step.
    const int hA = 16 * mt + g;
    float2 qv[KS][4];  // per k step: (hA, k), (hA + 8, k), (hA, k + 8), (hA + 8, k + 8)
    {
        const bool liveA = h0 + hA < a.n_head, liveB = h0 + hA + 8 < a.n_head;
        const float* qa = a.q + ((int64_t)t * a.n_head + h0 + hA) * D + kq * KD + 2 * t4;
        const float* qb = qa + 8 * D;
#pragma unroll
        for (int k = 0; k < KS; ++k) {
            qv[k][0] = liveA ? *(const float2*)(qa + 16 * k) : float2{};
            qv[k][1] = liveB ? *(const float2*)(qb + 16 * k) : float2{};
            qv[k][2] = liveA ? *(const float2*)(qa + 16 * k + 8) : float2{};
            qv[k][3] = liveB ? *(const float2*)(qb + 16 * k + 8) : float2{};
        }
    }
    // Heads hA and hA + 8's value over the block's P parts: each lane's part summed (or its max) over its quad, the
    // quad's result into red, and the P parts' read back in order.
    auto across = [&](float vA, float vB, bool is_max) {
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
            const float xA = __shfl_xor_sync(0xffffffffu, vA, sh), xB = __shfl_xor_sync(0xffffffffu, vB, sh);
            vA = is_max ? fmaxf(vA, xA) : vA + xA, vB = is_max ? fmaxf(vB, xB) : vB + xB;
        }
        if (t4 == 0) red[kq * kPrHeads + hA] = vA, red[kq * kPrHeads + hA + 8] = vB;
        __syncthreads();
        float2 r = make_float2(red[hA], red[hA + 8]);
#pragma unroll
        for (int q = 1; q < P; ++q) {
            const float x = red[q * kPrHeads + hA], y = red[q * kPrHeads + hA + 8];
            r.x = is_max ? fmaxf(r.x, x) : r.x + x, r.y = is_max ? fmaxf(r.y, y) : r.y + y;
        }
        __syncthreads();  // red is written again by the next call
        return r;
    };
    if (a.rope_pos) {  // q's RMSNorm (no weight), then RoPE of each head's last n_rot dims
        float ss[2] = {0.0f, 0.0f};  // heads hA, hA + 8
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
            for (int j = 0; j < 4; ++j) ss[j & 1] += qv[k][j].x * qv[k][j].x + qv[k][j].y * qv[k][j].y;
        const float2 sum = across(ss[0], ss[1], false);
        const float rnA = 1.0f / sqrtf(sum.x / (float)D + a.eps), rnB = 1.0f / sqrtf(sum.y / (float)D + a.eps);
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float rn = j & 1 ? rnB : rnA;
                float2 v = make_float2(qv[k][j].x * rn, qv[k][j].y * rn);
                const int r = kq * KD + 16 * k + 8 * (j >> 1) + 2 * t4 - (D - a.n_rot);
                if (r >= 0) {
                    const float c = cs[r / 2], sn = cs[half_rot + r / 2];
                    v = make_float2(v.x * c - v.y * sn, v.x * sn + v.y * c);
                }
                qv[k][j] = v;
            }
    }
    uint32_t qhi[KS][4], qlo[KS][4];
    {
        float m2[2] = {0.0f, 0.0f};
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
            for (int j = 0; j < 4; ++j) m2[j & 1] = fmaxf(m2[j & 1], fmaxf(fabsf(qv[k][j].x), fabsf(qv[k][j].y)));
        const float2 amax = across(m2[0], m2[1], true);
        const int eA = f16_scale_exp(amax.x), eB = f16_scale_exp(amax.y);
        const float invA = pow2f(-eA), invB = pow2f(-eB);
        if (kq == 0 && t4 == 0) qscale[hA] = pow2f(eA), qscale[hA + 8] = pow2f(eB);
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float inv = j & 1 ? invB : invA;
                __half xh, xl, yh, yl;
                split_f16(qv[k][j].x * inv, xh, xl), split_f16(qv[k][j].y * inv, yh, yl);
                qhi[k][j] = pack_f16(xh, yh), qlo[k][j] = pack_f16(xl, yl);
            }
    }

    float m_run[kHw], l_run[kHw];  // heads kHw warp ..
#pragma unroll
    for (int j = 0; j < kHw; ++j) m_run[j] = -INFINITY, l_run[j] = 0.0f;
    float o[NO][4] = {};
    for (int i = 0; i < n_tiles; ++i) {
        const int b = i & 1;
        cp_async_wait<0>();
        __syncthreads();  // tile i staged; every warp done with tile i - 1 (buffer b ^ 1)
        if (i + 1 < n_tiles) stage(i + 1, b ^ 1);
        const __half* kt = ks + b * kPfRows * ST;

        {   // partial scores of heads 16 mt .., all 32 rows, this warp's part of the dims (the high and low parts of
            // Q in separate sums: chains half as long)
            float hi[4][4] = {}, lo[4][4] = {};
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                const int k0 = kq * KD + 16 * k;
#pragma unroll
                for (int np = 0; np < 2; ++np) {  // n8 tiles 2 np, 2 np + 1: rows 16 np .. + 15
                    uint32_t bf[4];
                    const int r = 16 * np + 8 * (lane >> 4) + (lane & 7);
                    ldmatrix_x4(bf, smem_addr(kt + r * ST + k0 + 8 * ((lane >> 3) & 1)));
                    mma_f16(hi[2 * np], qhi[k], {bf[0], bf[1]});
                    mma_f16(lo[2 * np], qlo[k], {bf[0], bf[1]});
                    mma_f16(hi[2 * np + 1], qhi[k], {bf[2], bf[3]});
                    mma_f16(lo[2 * np + 1], qlo[k], {bf[2], bf[3]});
                }
            }
            float* out = sp + (kq * kPrHeads + hA) * kPrSpPad + 2 * t4;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                *(float2*)(out + 8 * nt) = make_float2(hi[nt][0] + lo[nt][0], hi[nt][1] + lo[nt][1]);
                *(float2*)(out + 8 * kPrSpPad + 8 * nt) = make_float2(hi[nt][2] + lo[nt][2], hi[nt][3] + lo[nt][3]);
            }
        }
        __syncthreads();
        // online softmax: warp w owns heads kHw w ..; lane = row of the tile
        const bool valid = row_ok[b][lane];
#pragma unroll
        for (int j = 0; j < kHw; ++j) {
            const int hh = kHw * warp + j;
            const float* sh = sp + hh * kPrSpPad + lane;
            float sum = sh[0];
#pragma unroll
            for (int q = 1; q < P; ++q) sum += sh[q * kPrHeads * kPrSpPad];
            const float s = valid ? sum * qscale[hh] * a.scale : -INFINITY;
            const float c = softmax_step(s, m_run[j], l_run[j], ps[hh * kPfPadP + lane],
                                         ps[(kPrHeads + hh) * kPfPadP + lane]);
            if (lane == 0) corr[hh] = c;
        }
        __syncthreads();
        {   // O = O * corr + P V: heads 16 mt .., dims of part kq
            const float c0 = corr[hA], c1 = corr[hA + 8];
#pragma unroll
            for (int j = 0; j < NO; ++j) o[j][0] *= c0, o[j][1] *= c0, o[j][2] *= c1, o[j][3] *= c1;
#pragma unroll
            for (int r0 = 0; r0 < kPfRows; r0 += 16) {
                uint32_t phi[4], plo[4];
                frag_a(phi, ps + 16 * mt * kPfPadP, kPfPadP, r0, g, t4);
                frag_a(plo, ps + (kPrHeads + 16 * mt) * kPfPadP, kPfPadP, r0, g, t4);
#pragma unroll
                for (int j = 0; j < NO; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, smem_addr(kt + (r0 + (lane & 15)) * ST + kq * KD + 8 * j + 8 * (lane >> 4)));
                    mma_f16(o[j], phi, {bf[0], bf[1]});
                    mma_f16(o[j], plo, {bf[0], bf[1]});
                    mma_f16(o[j + 1], phi, {bf[2], bf[3]});
                    mma_f16(o[j + 1], plo, {bf[2], bf[3]});
                }
            }
        }
    }
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < kHw; ++j) m_fin[kHw * warp + j] = m_run[j], l_fin[kHw * warp + j] = l_run[j];
    __syncthreads();
    // out = O e^(m - M) / (e^(sink - M) + l e^(m - M)), M = max(m, sink); with rope_pos V's rotated tail turned back.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int hh = hA + 8 * half, h = h0 + hh;
        if (h >= a.n_head) continue;
        const float sink = a.sinks[h], m = m_fin[hh];
        const float M = fmaxf(m, sink), w = m == -INFINITY ? 0.0f : expf(m - M);
        const float f = w / (expf(sink - M) + l_fin[hh] * w);
        float* out = a.out + ((int64_t)t * a.n_head + h) * D + kq * KD + 2 * t4;
#pragma unroll
        for (int j = 0; j < NO; ++j) {
            float2 v = make_float2(o[j][2 * half] * f, o[j][2 * half + 1] * f);
            const int r = kq * KD + 8 * j + 2 * t4 - (D - a.n_rot);
            if (a.rope_pos && r >= 0) {
                const float c = cs[r / 2], sn = cs[half_rot + r / 2];
                v = make_float2(v.x * c + v.y * sn, v.y * c - v.x * sn);
            }
            *(float2*)(out + 8 * j) = v;
        }
    }
}

template <int D>
cudaError_t attention_prefill_launch(cudaStream_t s, const AttnArgs& a, int n_tok) {
    const size_t smem = PrSmem<D>::bytes;
    cudaError_t e = allow_smem(attention_prefill_kernel<D>, smem);
    if (e != cudaSuccess) return e;
    return launch(attention_prefill_kernel<D>, dim3((unsigned)ceil_div(a.n_head, kPrHeads), n_tok),
                  dim3(64 * kPrParts), smem, s, a);
}

// The split kernel of decode: the tensor-core one for f16 rows where its shared memory fits, else the CUDA-core one.
template <int DL, typename R>
cudaError_t attention_splits(cudaStream_t s, const AttnArgs& a, int n_tok) {
    constexpr int D = 32 * DL;
    if (sizeof(R) == 2 && PfSmem<D>::bytes <= props().smem_optin)
        return a.kv_x ? attention_tc_launch<D, true>(s, a, n_tok) : attention_tc_launch<D, false>(s, a, n_tok);
    const size_t smem = kRows * (sizeof(R) * D + 16) + kHeads * D * 4 + kHeads * kRows * 4 + kRows * 4;
    const cudaError_t e = allow_smem(attention_split_kernel<DL, R>, smem);
    if (e != cudaSuccess) return e;
    return launch(attention_split_kernel<DL, R>, dim3(a.n_split, (unsigned)ceil_div(a.n_head, kHeads), n_tok),
                  dim3(32 * kHeads), smem, s, a);
}

template <int DL, typename R>
cudaError_t attention_launch(cudaStream_t s, const AttnArgs& a, int n_tok) {
    const cudaError_t e = attention_splits<DL, R>(s, a, n_tok);
    if (e != cudaSuccess) return e;
    return launch(attention_combine_kernel, dim3(a.n_head, n_tok), dim3(128), 2 * a.n_split * sizeof(float), s, a);
}

// The arguments both attention entry points share (heads_per_block: the grid's head dimension).
cudaError_t check_args(const AttnArgs& a, int n_tok, int heads_per_block) {
    if (a.dim != 128 && a.dim != 256 && a.dim != 512) return invalid("attention: dim must be 128, 256 or 512");
    if (n_tok < 1 || n_tok > 65535 || a.n_head < 1 || a.n_head > 65535 * heads_per_block || a.raw_cap < 0 ||
        a.comp_cap < 0 || (a.sel && a.sel_cap < 1) || !a.raw_n || !a.comp_n || !a.sinks)
        return invalid("attention: bad counts (n_tok, n_head, capacities) or missing raw_n / comp_n / sinks");
    if ((uintptr_t)a.raw % 16 || (uintptr_t)a.comp % 16 || (uintptr_t)a.q % 16 || (uintptr_t)a.out % 16 ||
        (uintptr_t)a.part % 16 || a.raw_stride % 8 || a.comp_stride % 8)
        return invalid("attention: q, out, scratch and the row stores must be 16-byte aligned");
    return cudaSuccess;
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

size_t ds4_cuda_attention_scratch_bytes(int n_tok, int n_head, int dim, int raw_cap, int comp_cap, int sel_cap,
                                        bool has_sel) {
    // one tile per split: the most splits any decode launch of these capacities takes
    const int n_split = split_count(raw_cap + (has_sel ? sel_cap : comp_cap), raw_cap, 1);
    return (size_t)n_tok * n_head * std::max(1, n_split) * (dim + 4) * sizeof(float);
}

cudaError_t ds4_cuda_attention_decode(cudaStream_t s, float* out, void* scratch, const float* q, const void* raw,
                                      int64_t raw_stride, const int32_t* raw_n, int raw_cap, const void* comp,
                                      int64_t comp_stride, const int32_t* comp_n, int comp_cap, const int32_t* sel,
                                      int sel_cap, const float* sinks, int n_tok, int n_head, int dim, float scale,
                                      const void* const* raw_rows, const void* const* comp_rows, bool f32_rows,
                                      const int32_t* rope_pos, const double* rope_freq, int n_rot,
                                      const float* kv_x, const float* kv_w, float eps, int n_nope, void* xq,
                                      int xq_groups) {
    clear_error();
    // The tensor-core kernel takes up to kCompSplits splits of compressed rows (a ratio-128 layer at 1M positions:
    // 8,192 rows in 256 one-tile splits wrote and combined 34 MB of partial results); the CUDA-core one a tile each.
    constexpr int kCompSplits = 64;
    const int cap_rows = raw_cap + (sel ? sel_cap : comp_cap), raw_tiles = (int)ceil_div(raw_cap, kRows);
    const int tiles = !f32_rows && ds4_cuda_attention_prefill_ok(dim)
                          ? std::max(1, (int)ceil_div(ceil_div(cap_rows, kRows) - raw_tiles, kCompSplits))
                          : 1;
    const int n_split = std::max(1, split_count(cap_rows, raw_cap, tiles));
    const int xq_heads = xq ? n_head / std::max(1, xq_groups) : 0;  // checked below
    const size_t xq_bytes = xq ? ds4_cuda_matvec_work_bytes(ds4::TYPE_Q8_0, n_tok, (int64_t)dim * xq_heads, 1) : 0;
    AttnArgs a{out,       (float*)scratch, q,    (const uint8_t*)raw, raw_stride, (const uint8_t* const*)raw_rows,
               raw_n,     raw_cap,         (const uint8_t*)comp,     comp_stride, (const uint8_t* const*)comp_rows,
               comp_n,    comp_cap,        sel,  sel_cap,             sinks,      n_head,
               dim,       n_split,         tiles, scale,              rope_pos,   rope_freq,
               n_rot,     kv_x,            kv_w, eps,                 n_nope,     (uint8_t*)xq,
               (int64_t)xq_bytes, xq_heads};
    cudaError_t e = check_args(a, n_tok, kHeads);
    if (e != cudaSuccess) return e;
    if (rope_pos && (!rope_freq || n_rot < 4 || n_rot % 4 || n_rot > dim))
        return invalid("attention: the inverse RoPE needs its frequencies and n_rot a multiple of 4 up to dim");
    if (kv_x && (f32_rows || !ds4_cuda_attention_prefill_ok(dim) || !rope_pos || !kv_w || raw_cap < 1 ||
                 n_nope < 0 || n_nope % 64 || n_nope > dim || (uintptr_t)kv_x % 16 || (uintptr_t)kv_w % 16))
        return invalid("attention: the decode front needs f16 rows on the tensor-core kernel, positions, the K=V "
                       "norm weight, a ring (raw_cap >= 1), n_nope a multiple of 64 up to dim, 16-byte aligned rows");
    if (a.n_split > 65535) return invalid("attention: too many rows");
    if (xq && (n_tok <= 2 || xq_groups < 1 || n_head % xq_groups || (uintptr_t)xq % 16))
        return invalid("attention: the Q8_0 output needs n_tok > 2, groups dividing n_head and a 16-byte aligned "
                       "workspace");
    switch (dim * (f32_rows ? -1 : 1)) {
        case 128: return attention_launch<4, __half>(s, a, n_tok);
        case 256: return attention_launch<8, __half>(s, a, n_tok);
        case 512: return attention_launch<16, __half>(s, a, n_tok);
        case -128: return attention_launch<4, float>(s, a, n_tok);
        case -256: return attention_launch<8, float>(s, a, n_tok);
        default: return attention_launch<16, float>(s, a, n_tok);
    }
}

bool ds4_cuda_attention_prefill_ok(int dim) {  // both tensor-core kernels: the decode splits' and the prefill's
    const size_t need = dim == 128   ? std::max(PfSmem<128>::bytes, PrSmem<128>::bytes)
                        : dim == 256 ? std::max(PfSmem<256>::bytes, PrSmem<256>::bytes)
                                     : std::max(PfSmem<512>::bytes, PrSmem<512>::bytes);
    return (dim == 128 || dim == 256 || dim == 512) && need <= props().smem_optin;
}

cudaError_t ds4_cuda_attention_prefill(cudaStream_t s, float* out, const float* q, const void* raw,
                                       int64_t raw_stride, const int32_t* raw_n, int raw_cap, const void* comp,
                                       int64_t comp_stride, const int32_t* comp_n, int comp_cap, const int32_t* sel,
                                       int sel_cap, const float* sinks, int n_tok, int n_head, int dim, float scale,
                                       const void* const* raw_rows, const void* const* comp_rows,
                                       const int32_t* rope_pos, const double* rope_freq, int n_rot, float eps) {
    clear_error();
    AttnArgs a{out,       nullptr,  q,    (const uint8_t*)raw, raw_stride, (const uint8_t* const*)raw_rows,
               raw_n,     raw_cap,  (const uint8_t*)comp,     comp_stride, (const uint8_t* const*)comp_rows,
               comp_n,    comp_cap, sel,  sel_cap,             sinks,      n_head,
               dim,       0,        1,    scale,               rope_pos,   rope_freq,
               n_rot,     nullptr,  nullptr, eps};
    const cudaError_t e = check_args(a, n_tok, kPrHeads);
    if (e != cudaSuccess) return e;
    if (rope_pos && (!rope_freq || n_rot < 4 || n_rot % 4 || n_rot > dim))
        return invalid("attention_prefill: the RoPE needs its frequencies and n_rot a multiple of 4 up to dim");
    switch (dim) {
        case 128: return attention_prefill_launch<128>(s, a, n_tok);
        case 256: return attention_prefill_launch<256>(s, a, n_tok);
        default: return attention_prefill_launch<512>(s, a, n_tok);
    }
}
