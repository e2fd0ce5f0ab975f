// Weight-streaming dot products: the machinery under every matrix kernel (matvec.cu, moe.cu).
//
// Owns, per weight type: the staging of weight bytes into shared memory, the 8-bit activation quantizers (the
// CPU's act8 formats, ds4_quant.h), and the per-32-weight dot products on staged blocks. Does not own which rows
// a kernel walks or what it does with a finished dot (the kernels pass a plan and a flush).
//
// How bytes move. Each warp streams its own rows through a ring of kDepth stages in shared memory. A stage holds
// 1024 * SPS consecutive weights of each of the warp's RPW rows (about 2 KB per row in a plain product), copied
// with 16-byte cp.async (lane i copies chunks i, i + 32, ...: one coalesced 512-byte request per instruction);
// kDepth - 1 stages are in flight while one is computed. A row's bytes need not be 16-byte aligned (Q8_0 blocks
// are 34 bytes, IQ2_XXS 66): the copy starts at the 16-byte boundary below and the compute reads at the offset.
// Reading from shared memory lets the block layouts be decoded with aligned 4/16-byte loads whatever the block
// size, and lets one copy of the activations serve all rows. Bookkeeping is kept small on purpose (counters, not
// divisions, for the next stage to issue; 2 KB stages): at 4.26 TB/s an SM must retire a 2 KB stage about every
// 130 cycles, which is the whole issue budget of a few hundred warp instructions (ncu, docs/CUDA_NOTES.md).
//
// How a stage is computed. The unit of work is 32 consecutive weights of a row (one Q8_0 block, one Q4_K /
// IQ2_XXS sub-block, two Q2_K sub-blocks, or 32 floats/halves): lane i takes units i, i + 32, ... of the stage,
// so the activations a warp reads at once are contiguous (their halves swizzled, act_swz: no bank conflicts).
// Quantized types take 8 exact dp4a products per unit and token against the int8 activations, then one f32 scale
// step per unit; float types take f32 FMAs. Each lane accumulates its units in f32; the kernel's flush reduces the
// warp. Two exceptions take 64 weights a lane: the routed down's Q2_K stages (q2k_quarter_dot: a quarter's 2-bit
// values share their bytes with three other quarters') and the routed gate+up's IQ2_XXS ones (iq2_pair_dot: two
// groups of one block share its scale).
#pragma once
#include "common.cuh"

namespace ds4::cuda {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
// IQ2_XXS tables: selectors per grid point, then per 7-bit sign index, then the kIq2Lo word (read from shared
// memory so that it stays in a register; padded to 16 bytes). In shared memory they take one of two layouts:
// compact (word w at w), or one copy per lane (word w of lane l at 32 w + l, LANES below): a warp's lookups at
// random grid and sign indices then never share a bank, where the compact tables cost ~2.8 wavefronts a lookup.
// The per-lane copy starts at a 16 KB boundary of the shared window (lanes_tables; table_bytes counts the room): a
// lane's table address then has no bit where a sign index's offset goes, so the two join by one OR.
constexpr int kIq2TableWords = 256 + 128 + 4, kIq2LoWord = 256 + 128;
constexpr uint32_t kLanesAlign = 16384;

// Device copy of the IQ2_XXS tables for the current device (allocated by ds4_cuda_init, null before).
const uint32_t* iq2_tables();

// ---- per-type constants ----------------------------------------------------------------------------------------

constexpr int kDepth = 3;  // ring stages per warp: two in flight while one is computed

template <int T>
struct WT;
// bw: weights per block, bb: bytes per block, sps: 1024-weight steps per stage of a plain product (about 2 KB per
// row), xb: activation block (32: Q8_0 activations, 256: Q8_K), 0 for f32 activations.
template <> struct WT<TYPE_F32> { static constexpr int bw = 1, bb = 4, sps = 1, xb = 0; };
template <> struct WT<TYPE_F16> { static constexpr int bw = 1, bb = 2, sps = 1, xb = 0; };
template <> struct WT<TYPE_BF16> { static constexpr int bw = 1, bb = 2, sps = 1, xb = 0; };
template <> struct WT<TYPE_Q8_0> { static constexpr int bw = 32, bb = 34, sps = 2, xb = 32; };
template <> struct WT<TYPE_Q2_K> { static constexpr int bw = 256, bb = 84, sps = 8, xb = 256; };
template <> struct WT<TYPE_Q4_K> { static constexpr int bw = 256, bb = 144, sps = 4, xb = 256; };
template <> struct WT<TYPE_IQ2_XXS> { static constexpr int bw = 256, bb = 66, sps = 8, xb = 256; };

// A stage of SPS steps: weights and bytes per row, and the shared-memory slot of one row (+ alignment offset and
// the decoders' over-read).
template <int T, int SPS>
struct Stage {
    static constexpr int weights = 1024 * SPS;
    static constexpr int bytes = weights / WT<T>::bw * WT<T>::bb;
    static constexpr int slot = (bytes + 32 + 15) / 16 * 16;
};

// Shared-memory bytes of n rows of quantized activations of `cols` values (qs, then d, then bsums), or 0.
template <int T>
__host__ __device__ constexpr size_t act_bytes(int n, int64_t cols) {
    constexpr int xb = WT<T>::xb;
    if constexpr (xb == 0) {
        return 0;
    } else {
        const size_t b = (size_t)n * cols + 4 * (size_t)n * (cols / xb) + (xb == 256 ? 2 * (size_t)n * (cols / 16) : 0);
        return (b + 15) / 16 * 16;
    }
}

// Whether rows of `cols` weights of type T can be streamed (float rows: whole, aligned 8-value pieces).
inline bool cols_ok(int type, int64_t cols) {
    const int bw = block_weights(type);
    if (bw == 0 || cols <= 0 || cols % bw) return false;
    if (type == TYPE_F16 || type == TYPE_BF16 || type == TYPE_F32) return cols % 8 == 0;  // pieces of 8
    return true;
}

// ---- activations -----------------------------------------------------------------------------------------------

// A view of the activations a dot reads: quantized rows in shared memory (act8 types), or for float types f32
// rows in shared or global memory or f16 rows in shared memory. Token t's row is at qs + t * qs_tok etc.
struct XView {
    const int8_t* qs;
    const float* d;
    const int16_t* bs;
    int qs_tok, d_tok, bs_tok;
    const float* xf;     // f32 rows, xf_tok apart
    const __half* xh;    // or f16 rows (scaled by a power of two per row), xf_tok apart
    int64_t xf_tok;
};

// Quantized activations that stage_dot reads from shared memory (quantize_block, copy_act) keep the two 16-byte
// halves of every 32-value unit swapped where the unit's index in its row has bit 2 set: act_swz maps a byte's
// offset in its row to where it lies. Lane i reads unit i + 32 j, so the first halves of a warp's units then fall
// on every bank (lanes i and i + 4 were 128 bytes apart: each 16-byte load of the activations took 8 wavefronts
// instead of 4); act_half(lane) is where a lane's first half lies in its unit. Planes in global memory (the
// workspaces, ds4_cuda_quantize_act) keep the CPU's order.
__host__ __device__ constexpr int64_t act_swz(int64_t k) {
    return k ^ ((k >> 3) & 16);
}
__device__ __forceinline__ int act_half(int lane) {
    return (lane & 4) << 2;
}
// The routed down's Q2_K stages by quarters (q2k_quarter_dot) and the routed gate+up's IQ2_XXS stages by pairs of
// groups (iq2_pair_dot) take a lane's activations in runs of 64 values, 16 bytes at a time: run Q's chunk c lies at
// chunk c ^ ((Q >> 1) & 3) of the run, so that the 8 lanes of a load phase (runs Q .. Q + 7 of a row, Q a multiple
// of 8) fall on 8 distinct 16-byte bank groups. Rows of a multiple of 512 values.
__host__ __device__ constexpr int64_t act_swz_q(int64_t k) {
    return k ^ ((k >> 3) & 0x30);
}
// The layouts of the qs plane in shared memory (SWZ of quantize_rows, quantize_block and copy_act): 0 the CPU's
// order, kSwzUnits act_swz, kSwzQuarters act_swz_q.
constexpr int kSwzUnits = 1, kSwzQuarters = 2;
template <int SWZ>
__host__ __device__ constexpr int64_t act_place(int64_t k) {
    return SWZ == kSwzQuarters ? act_swz_q(k) : SWZ == kSwzUnits ? act_swz(k) : k;
}

// Points a view at n rows of `cols` quantized activations laid out by act_bytes (row-major planes).
template <int T>
__device__ __forceinline__ XView act_view(uint8_t* base, int n, int64_t cols) {
    constexpr int xb = WT<T>::xb;
    XView v{};
    v.qs = (const int8_t*)base;
    v.d = (const float*)(base + (size_t)n * cols);
    v.bs = (const int16_t*)(base + (size_t)n * cols + 4 * (size_t)n * (cols / (xb ? xb : 1)));
    v.qs_tok = (int)cols;
    v.d_tok = xb ? (int)(cols / xb) : 0;
    v.bs_tok = (int)(cols / 16);
    return v;
}

// An RMS norm applied to activation rows as they are quantized: row r's values become x * inv[r] * w[col] (x /
// sqrt(mean(x^2) + eps) * w to a rounding of the reciprocal), also written to xn (dense rows of cols values) when
// xn is not null. A product of normed activations then needs no norm launch before it.
struct RowNorm {
    const float* inv;  // per row: 1 / sqrt(mean(x^2) + eps) (row_norms)
    const float* w;    // per column
    float* xn;
};

// Brings the n floats at w into L1 (one prefetch per 128-byte line, by the block's threads): a norm's weight,
// before the dependent-launch wait, so that the quantizer meets it in L1.
__device__ __forceinline__ void prefetch_l1(const float* w, int64_t n) {
    for (int64_t i = 32 * (int64_t)threadIdx.x; i < n; i += 32 * (int64_t)blockDim.x)
        asm volatile("prefetch.global.L1 [%0];" ::"l"(w + i));
}

// inv[r] = 1 / sqrt(mean(x_r^2) + eps) for r < n (rows x_stride apart), one warp per row: warps first, first +
// step, ...
__device__ __forceinline__ void row_norms(float* inv, const float* x, int64_t x_stride, int n, int64_t cols,
                                          float eps, int first, int step) {
    const int lane = threadIdx.x & 31;
    for (int r = first; r < n; r += step) {
        const float* xr = x + r * x_stride;
        float ss = 0.0f;
        for (int64_t k = 4 * lane; k < cols; k += 128) ss = sumsq4(*(const float4*)(xr + k), ss);
        ss = warp_sum(ss);
        if (lane == 0) inv[r] = 1.0f / sqrtf(ss / (float)cols + eps);
    }
}

// One Q8_K block (256 values) held 8 per lane (lane i: values 8 i .. 8 i + 7), rounded as ds4_quant.h rounds it:
// m = the value of largest |x| (the first on ties; 5 shuffles), iscale = -127 / m, d = 1 / iscale, q = min(rint(x
// iscale), 127). Packs the lane's 8 q into w and returns d; sum: their sum (a 16-value sum is two lanes').
__device__ __forceinline__ float q8_k_lane(const float (&v)[8], int lane, uint32_t (&w)[2], int& sum) {
    float best = v[0];
    int at = 8 * lane;
#pragma unroll
    for (int k = 1; k < 8; ++k)
        if (fabsf(v[k]) > fabsf(best)) best = v[k], at = 8 * lane + k;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oa = __shfl_xor_sync(0xffffffffu, at, o);
        if (fabsf(ob) > fabsf(best) || (fabsf(ob) == fabsf(best) && oa < at)) best = ob, at = oa;
    }
    const float iscale = best == 0.0f ? 0.0f : -127.0f / best;
    w[0] = w[1] = 0u;
    sum = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int q = (int)fminf(rintf(__fmul_rn(v[k], iscale)), 127.0f);
        w[k / 4] |= ((uint32_t)q & 255u) << (8 * (k % 4));
        sum += q;
    }
    return best == 0.0f ? 0.0f : 1.0f / iscale;
}

// The act8 quantizers of ds4_quant.h, every operation rounded as on the CPU (so the int8 values and scales are
// bit for bit those of ds4d._cpu.quantize_act). Row i of x is at x + i * x_stride; the outputs are dense rows
// (qs: cols, d: cols / XB, bs: cols / 16). A Q8_0 block (32 values) is one lane's: its 8 float4 loads are in
// flight together and its maximum needs no shuffles; a Q8_K block (256) is a warp's, 8 values a lane, and meets in
// 5 shuffles (as 8 lanes of 32 values each, its search for the largest value was a chain of 31 steps per lane: a
// pass over 6 x 2048 values took a block of 12 warps ~5 us). Called by all warps of a block (or of a grid:
// `first`/`step` are the warp's index and the number of warps); a warp takes quantize_per_warp<XB> consecutive
// blocks at a time. With nrm, the rows are normed first. SWZ: the qs rows by act_swz (stage_dot's shared memory).
// For the tensor-core products' activations (gemm.cu, Q8_K): PAIRS, each 32-value unit's words in the order 0, 2,
// 4, 6, 1, 3, 5, 7 (IQ2_XXS: an mma fragment's words t and 4 + t are then grid point t's 8 weights); F16_SUMS, the
// sums per 16 as f16 bits (exact: |sum| <= 2032), the K types' min-term mma operands as they are.
template <int XB>
constexpr int quantize_per_warp = XB == 32 ? 32 : 1;
template <int XB, int SWZ = 0, bool PAIRS = false, bool F16_SUMS = false>
__device__ void quantize_rows(int8_t* qs, float* d, int16_t* bs, const float* x, int64_t x_stride, int n_rows,
                              int64_t cols, int first, int step, const RowNorm* nrm = nullptr) {
    constexpr int kPerWarp = quantize_per_warp<XB>;  // blocks per warp and pass
    constexpr int kLanes = 32 / kPerWarp;             // lanes per block
    constexpr int V = XB / kLanes;                    // values per lane
    const int lane = threadIdx.x & 31, sub = lane % kLanes;
    const int64_t per_row = cols / XB, total = n_rows * per_row;
    // The norm's fields read once, and a lane's loads all issued before its first store: with a store to xn
    // between them (which may alias x, the weight or *nrm) each load waited for the one before, and the fields
    // were read again after every store.
    const float* const n_inv = nrm ? nrm->inv : nullptr;
    const float* const n_w = nrm ? nrm->w : nullptr;
    float* const n_xn = nrm ? nrm->xn : nullptr;
    for (int64_t b0 = (int64_t)first * kPerWarp; b0 < total; b0 += (int64_t)step * kPerWarp) {
        const int64_t blk = b0 + lane / kLanes;
        const bool on = blk < total;
        const int64_t row = (on ? blk : 0) / per_row, b = (on ? blk : 0) - row * per_row, col = b * XB + V * sub;
        const float* src = x + row * x_stride + col;
        float v[V];
        if (on) {
            float4 f[V / 4];
#pragma unroll
            for (int k = 0; k < V / 4; ++k) f[k] = *(const float4*)(src + 4 * k);
            if (n_w) {
                float4 g[V / 4];
#pragma unroll
                for (int k = 0; k < V / 4; ++k) g[k] = *(const float4*)(n_w + col + 4 * k);
                const float r = n_inv[row];
#pragma unroll
                for (int k = 0; k < V / 4; ++k)
                    f[k] = make_float4(f[k].x * r * g[k].x, f[k].y * r * g[k].y, f[k].z * r * g[k].z,
                                       f[k].w * r * g[k].w);
                if (n_xn)
#pragma unroll
                    for (int k = 0; k < V / 4; ++k) *(float4*)(n_xn + row * cols + col + 4 * k) = f[k];
            }
#pragma unroll
            for (int k = 0; k < V / 4; ++k)
                v[4 * k] = f[k].x, v[4 * k + 1] = f[k].y, v[4 * k + 2] = f[k].z, v[4 * k + 3] = f[k].w;
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = 0.0f;
        }
        uint32_t w[V / 4] = {};
        int sum = 0;            // Q8_K: the lane's half of a 16-value sum
        float dd, inv = 0.0f;   // the block's d; Q8_0: what multiplies x
        if constexpr (XB == 32) {
            // Q8_0: amax = max|x|; d = amax / 127; id = d != 0 ? 1 / d : 0; q = clamp(rint(x * id), -127, 127).
            float amax = 0.0f;
#pragma unroll
            for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(v[k]));
            inv = q8_0_inv(amax, dd);
        } else {
            static_assert(V == 8, "Q8_K: a 16-value sum is two lanes'");
            dd = q8_k_lane(v, sub, w, sum);  // the whole warp's block (kPerWarp 1)
        }
        if (!on) continue;
        if constexpr (XB == 32)
#pragma unroll
            for (int k = 0; k < V; ++k) w[k / 4] |= ((uint32_t)q8_0_value(v[k], inv) & 255u) << (8 * (k % 4));
        int8_t* dst = qs + row * cols;
#pragma unroll
        for (int k = 0; k < V / 16; ++k)
            *(uint4*)(dst + act_place<SWZ>(col + 16 * k)) =
                make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
        if constexpr (PAIRS) {
            static_assert(V == 8, "PAIRS: a lane's 8 values are words 2 m, 2 m + 1 of its unit (m = sub % 4)");
            int8_t* unit = dst + (col & ~31) + 4 * (sub & 3);
            *(uint32_t*)unit = w[0];
            *(uint32_t*)(unit + 16) = w[1];
        } else if constexpr (V % 16) {
            *(uint2*)(dst + act_place<SWZ>(col)) = make_uint2(w[V / 4 - 2], w[V / 4 - 1]);
        }
        if (sub == 0) d[row * per_row + b] = dd;
        if constexpr (XB == 256) {
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            const int16_t v = F16_SUMS ? __half_as_short(__int2half_rn(sum)) : (int16_t)sum;
            if ((sub & 1) == 0) bs[row * (cols / 16) + b * 16 + sub / 2] = v;
        }
    }
}

// Quantizes n rows into shared memory laid out for act_view (the qs plane by act_place<SWZ>), using every thread
// of the block (normed first with nrm).
template <int T, int SWZ = kSwzUnits>
__device__ __forceinline__ void quantize_block(uint8_t* base, const float* x, int64_t x_stride, int n, int64_t cols,
                                               const RowNorm* nrm = nullptr) {
    constexpr int xb = WT<T>::xb;
    if constexpr (xb != 0) {
        const XView v = act_view<T>(base, n, cols);
        quantize_rows<xb, SWZ>((int8_t*)v.qs, (float*)v.d, (int16_t*)v.bs, x, x_stride, n, cols, threadIdx.x >> 5,
                               blockDim.x >> 5, nrm);
    }
}

// Quantizes n_rows activation rows per group into `work`, one act_view block of group_bytes per group (blockIdx.y):
// group g's rows start at x + g * group_stride, x_stride apart (a matvec's column groups; the MoE's tokens).
// With norm_w, the rows are RMS-normed first (one group; every block finds the rows' norms itself) and the normed
// rows written to xn when it is not null.
constexpr int kNormRowsMax = 16;
template <int XB>
__global__ void quantize_groups_kernel(uint8_t* work, const float* x, int64_t group_stride, int64_t x_stride,
                                       int n_rows, int64_t cols, size_t group_bytes, const float* norm_w, float eps,
                                       float* xn) {
    __shared__ float inv[kNormRowsMax];
    pdl_trigger();
    if (norm_w) prefetch_l1(norm_w, cols);
    pdl_wait();
    const int g = blockIdx.y;
    uint8_t* base = work + g * group_bytes;
    int8_t* qs = (int8_t*)base;
    float* d = (float*)(base + (size_t)n_rows * cols);
    int16_t* bs = (int16_t*)(base + (size_t)n_rows * cols + 4 * (size_t)n_rows * (cols / XB));
    const int first = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), step = gridDim.x * (blockDim.x >> 5);
    const RowNorm nrm{inv, norm_w, xn};
    if (norm_w) {
        row_norms(inv, x, x_stride, n_rows, cols, eps, threadIdx.x >> 5, blockDim.x >> 5);
        __syncthreads();
    }
    quantize_rows<XB>(qs, d, bs, x + g * group_stride, x_stride, n_rows, cols, first, step, norm_w ? &nrm : nullptr);
}

// Launches quantize_groups_kernel for weights of type T (which must take 8-bit activations): `groups` blocks of
// act_bytes<T>(n_rows, cols) bytes at work; with norm_w (one group, n_rows <= kNormRowsMax) the rows RMS-normed.
template <int T>
cudaError_t quantize_groups(cudaStream_t s, uint8_t* work, const float* x, int64_t group_stride, int64_t x_stride,
                            int n_rows, int64_t cols, int groups, const float* norm_w = nullptr, float eps = 0.0f,
                            float* xn = nullptr) {
    constexpr int xb = WT<T>::xb;
    const int64_t blocks = n_rows * (cols / xb);  // per group
    const int gx = (int)std::min<int64_t>(ceil_div(blocks, kWarps * quantize_per_warp<xb>), props().sms);
    return launch(quantize_groups_kernel<xb>, dim3(gx, groups), dim3(kThreads), 0, s, work, x, group_stride, x_stride,
                  n_rows, cols, act_bytes<T>(n_rows, cols), norm_w, eps, xn);
}

// ---- per-unit dot products -------------------------------------------------------------------------------------

// x: the unit's activations in shared memory, its first half at x + h (act_half) and its second at x + (h ^ 16).
__device__ __forceinline__ int dot8(const int (&w)[8], const int8_t* x, int h) {
    const int4 a = *(const int4*)(x + h), b = *(const int4*)(x + (h ^ 16));
    int s0 = __dp4a(w[0], a.x, 0), s1 = __dp4a(w[1], a.y, 0);
    s0 = __dp4a(w[2], a.z, s0), s1 = __dp4a(w[3], a.w, s1);
    s0 = __dp4a(w[4], b.x, s0), s1 = __dp4a(w[5], b.y, s1);
    s0 = __dp4a(w[6], b.z, s0), s1 = __dp4a(w[7], b.w, s1);
    return s0 + s1;
}
// 4 unsigned weight bytes times 4 signed activation bytes, plus c.
__device__ __forceinline__ int dp4a_us(int w, int x, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(x), "r"(c));
    return d;
}
// The two halves (weights 0-15, 16-31) separately, for Q2_K's two sub-blocks per unit; its weights are unsigned
// bytes (the 2-bit values in place, up to 3 << 6: decode_unit's IN_PLACE).
__device__ __forceinline__ int2 dot8_halves(const int (&w)[8], const int8_t* x, int h) {
    const int4 a = *(const int4*)(x + h), b = *(const int4*)(x + (h ^ 16));
    int s0 = dp4a_us(w[0], a.x, 0), s1 = dp4a_us(w[1], a.y, 0);
    int s2 = dp4a_us(w[4], b.x, 0), s3 = dp4a_us(w[5], b.y, 0);
    s0 = dp4a_us(w[2], a.z, s0), s1 = dp4a_us(w[3], a.w, s1);
    s2 = dp4a_us(w[6], b.z, s2), s3 = dp4a_us(w[7], b.w, s3);
    return make_int2(s0 + s1, s2 + s3);
}

// 8 f32 products of 8 staged weights (already floats) with 8 activations (registers, or shared or global
// memory), in two chains.
__device__ __forceinline__ float dot8f(const float (&w)[8], const float (&a)[8]) {
    float s0 = w[0] * a[0], s1 = w[1] * a[1];
    s0 = fmaf(w[2], a[2], s0), s1 = fmaf(w[3], a[3], s1);
    s0 = fmaf(w[4], a[4], s0), s1 = fmaf(w[5], a[5], s1);
    s0 = fmaf(w[6], a[6], s0), s1 = fmaf(w[7], a[7], s1);
    return s0 + s1;
}
__device__ __forceinline__ float dot8f(const float (&w)[8], const float* x) {
    const float4 a = *(const float4*)x, b = *(const float4*)(x + 4);
    float s0 = w[0] * a.x, s1 = w[1] * a.y;
    s0 = fmaf(w[2], a.z, s0), s1 = fmaf(w[3], a.w, s1);
    s0 = fmaf(w[4], b.x, s0), s1 = fmaf(w[5], b.y, s1);
    s0 = fmaf(w[6], b.z, s0), s1 = fmaf(w[7], b.w, s1);
    return s0 + s1;
}

// IQ2_XXS through byte permutes: a grid point's 8 magnitudes (8, 25 or 43) are 2-bit codes, its 8 signs add 3 to
// a code, and prmt picks each weight's signed byte out of {8, 25, 43, -8, -25, -43}. The tables hold, per grid
// point and per 7-bit sign index, the two 4-weight selectors in the low and high 16 bits (ds4_cuda_init builds
// them), so that 8 signed weights cost two 32-bit lookups, one add and two prmt.
constexpr uint32_t kIq2Lo = 0xF82B1908u, kIq2Hi = 0x0000D5E7u;

// 4 signed weights from the low 16 bits of a selector; lo is the table's kIq2Lo word. prmt on the raw selector
// (its nibbles are 0-5: no masking, unlike __byte_perm).
__device__ __forceinline__ uint32_t iq2_pick(uint32_t lo, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(lo), "r"(kIq2Hi), "r"(sel));
    return d;
}

// A 32-bit load from a shared-memory address. Not ordered against other memory operations: only for the tables
// (written before the kernel's barrier) at an address that depends on data read after it.
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// Where a staged row's unit u lies, for the types whose 32-weight groups are not 4-byte aligned (Q8_0's 34-byte
// blocks, IQ2_XXS's 66-byte ones): its block (b: the scale) and its group's words, read from the aligned address at
// or below them (w) and funnel-shifted right by sh bits. Unit u + 32 j lies kUnitStride * j bytes further, a
// multiple of 4: a lane finds its first unit once per stage and row and steps by immediates (unit_step).
struct UnitAt {
    const uint8_t* b;
    const uint32_t* w;
    uint32_t sh;
};
template <int T>
constexpr int kUnitStride = T == TYPE_Q8_0 ? 32 * 34 : T == TYPE_IQ2_XXS ? 4 * 66 : 0;

// ALIGNED: row is 16-byte aligned (the misalignment then follows from u alone).
template <int T, bool ALIGNED = false>
__device__ __forceinline__ UnitAt unit_at(const uint8_t* row, int u) {
    if constexpr (kUnitStride<T> == 0) return {};
    const int off = T == TYPE_Q8_0 ? 34 * u : 66 * (u >> 3), goff = off + 2 + (T == TYPE_IQ2_XXS ? 8 * (u & 7) : 0);
    const uint8_t *b = row + off, *p = row + goff;
    const int mis = (int)((ALIGNED ? (uintptr_t)goff : (uintptr_t)p) & 3);
    return {b, (const uint32_t*)(p - mis), 8u * mis};  // pointer arithmetic keeps the loads LDS
}
template <int T>
__device__ __forceinline__ UnitAt unit_step(const UnitAt& a, int j) {
    return {a.b + kUnitStride<T> * j, a.w + kUnitStride<T> / 4 * j, a.sh};
}

// One IQ2_XXS group of 32 weights from its two words (grid: 4 grid indices; aux: 4 sign indices of 7 bits, then the
// 4-bit scale) into 8 words of signed bytes; returns the group scale 2 ls + 1. Table word w at byte w << ts (one copy
// per lane: 32 words apart), read by 32-bit shared-memory address so that an index becomes an address in one lea
// (the compiler's generic pointer arithmetic took two multiply-adds): the grid index is byte i of grid (one prmt),
// the sign index 7 bits of aux (shift, mask; with LANES the mask and the join to the 16 KB-aligned tables are one
// lop3). tab: as decode_unit's.
template <bool LANES>
__device__ __forceinline__ int iq2_group(uint32_t grid, uint32_t aux, const uint32_t* tab, int (&q)[8]) {
    constexpr int ts = LANES ? 7 : 2;
    const uint32_t tb = (uint32_t)__cvta_generic_to_shared(tab);
    const uint32_t lo = tab[(LANES ? 32 : 1) * kIq2LoWord];  // an ordinary load: its address is a constant
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t gi = __byte_perm(grid, 0, 0x4440 | i);
        const uint32_t si = (7 * i >= ts ? aux >> (7 * i - ts) : aux << (ts - 7 * i)) & (127u << ts);
        const uint32_t sel = lds32(tb + (gi << ts)) + lds32((LANES ? si | tb : si + tb) + (256 << ts));
        q[2 * i] = (int)iq2_pick(lo, sel);
        q[2 * i + 1] = (int)iq2_pick(lo, sel >> 16);
    }
    return 2 * (int)(aux >> 28) + 1;
}

// Decodes unit u (weights 32 u .. 32 u + 31) of a row's staged bytes of type T into 8 words of signed bytes and
// its scales: Q8_0 dw; Q4_K dw, dm and the sub-block's 6-bit scale and min (isc, imn); Q2_K dw, dm and the two
// 16-weight sub-blocks' scale bytes (isc, imn: low 4 bits scale, high 4 min; q holds the 2-bit values); IQ2_XXS
// dw (d / 8) and the group scale 2 ls + 1 (isc).
// at: unit_at(row, u) for Q8_0 and IQ2_XXS (unused otherwise). tab: the tables in shared memory; with LANES,
// already offset by the lane. IN_PLACE (Q2_K): q holds the 2-bit values where they lie in their bytes (masked, not
// shifted down: bits 2 (u & 3) and up), one shift fewer per word; a dot product of them is 4^(u & 3) times the
// values' (exact).
template <int T, bool LANES = false, bool IN_PLACE = false>
__device__ __forceinline__ void decode_unit(const uint8_t* row, int u, const UnitAt& at, const uint32_t* tab,
                                            int (&q)[8], float& dw, float& dm, int& isc, int& imn) {
    if constexpr (T == TYPE_Q8_0) {
        dw = f16_at(at.b);
        uint32_t prev = at.w[0];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t next = at.w[i + 1];
            q[i] = (int)__funnelshift_r(prev, next, at.sh);
            prev = next;
        }
    } else if constexpr (T == TYPE_Q4_K) {
        const int blk = u >> 3, sub = u & 7;
        const uint8_t* b = row + 144 * blk;
        const float2 dd = __half22float2(*(const __half2*)b);
        dw = dd.x, dm = dd.y;
        const uint32_t* sp = (const uint32_t*)(b + 4);
        const uint32_t sa = sp[0], sb = sp[1], sc = sp[2];
        const int sh = 8 * (sub & 3);
        if (sub < 4) {
            isc = (sa >> sh) & 63, imn = (sb >> sh) & 63;
        } else {
            isc = ((sc >> sh) & 15) | (((sa >> sh) >> 6 & 3) << 4);
            imn = ((sc >> sh) >> 4 & 15) | (((sb >> sh) >> 6 & 3) << 4);
        }
        const int4* qp = (const int4*)(b + 16 + 32 * (sub >> 1));
        const int4 w0 = qp[0], w1 = qp[1];
        const int shift = 4 * (sub & 1);
        const int raw[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = (raw[i] >> shift) & 0x0f0f0f0f;
    } else if constexpr (T == TYPE_Q2_K) {
        const int blk = u >> 3, pr = u & 7;  // sub-blocks 2 pr and 2 pr + 1
        const uint8_t* b = row + 84 * blk;
        const float2 dd = __half22float2(*(const __half2*)(b + 80));
        dw = dd.x, dm = dd.y;
        const uint32_t scs = *(const uint16_t*)(b + 2 * pr);
        isc = scs & 0xff, imn = scs >> 8;
        const uint32_t* qp = (const uint32_t*)(b + 16 + 32 * (pr >> 2));
        const int shift = 2 * (pr & 3);
#pragma unroll
        for (int i = 0; i < 8; ++i)
            q[i] = IN_PLACE ? (int)(qp[i] & (0x03030303u << shift)) : (int)((qp[i] >> shift) & 0x03030303u);
    } else {  // IQ2_XXS
        dw = f16_at(at.b) * 0.125f;  // the format's 1/8, exact
        const uint32_t w1 = at.w[1];
        isc = iq2_group<LANES>(__funnelshift_r(at.w[0], w1, at.sh), __funnelshift_r(w1, at.w[2], at.sh), tab, q);
    }
}

// Whether stage_dot takes a stage by Q2_K quarters (q2k_quarter_dot): the routed down's whole stages of 1024
// weights of RPW (even) experts' rows, each row against its own activations, laid out by kSwzQuarters.
template <int T, int SPS, int NB, int RPW, bool SHARED_X, bool FULL>
constexpr bool q2k_quarters() {
    return T == TYPE_Q2_K && SPS == 1 && NB == 1 && RPW % 2 == 0 && !SHARED_X && FULL;
}

// A Q2_K stage by quarters: lane l takes weights 64 q .. 64 q + 63 (q = l & 15) of rows 2 k + (l >> 4), k < RPW / 2,
// and adds rows 2 k and 2 k + 1 into acc[2 k] (for a flush that sums the rows). xv[r] must be xv[0] r tokens on (the
// down's views: row r meets expert slot r's mid row). A quarter is sub-blocks 4 p .. 4 p + 3 (p = q & 1) of one half
// of a block, whose 32 quant bytes hold weight i + 32 s at bits 2 s of byte i: the quarter is shifts 2 p and 2 p + 1
// of all 32. So a lane reads the half's 8 quant words once for 64 weights, its 4 scale bytes as one word, and the
// block's d and the activations' scale once, where a lane per 32 weights (decode_unit) re-read the 32 quant bytes
// for 2 bits of each: 16 shared loads per 64 weights instead of 30, and the scales' and sums' work once per quarter.
// The values stay in place (masked, not shifted down), so a chunk's dot is 4^s times the values' and one shift per
// quarter undoes it (exact). Activations: 16 bytes at a time from the quarter's run (act_swz_q); the 4 sums per 16
// as one 8-byte load, against the 4 mins by two dp2a.
template <int RPW>
__device__ __forceinline__ void q2k_quarter_dot(const uint8_t* const (&rp)[RPW], int lane, int64_t k0,
                                                const XView* xv, float (&acc)[RPW][1]) {
    const int q = lane & 15, blk = q >> 2, half = (q >> 1) & 1, p = q & 1, hi = lane >> 4;
    const int woff = 84 * blk + 16 + 32 * half, soff = 84 * blk + 8 * half + 4 * p, doff = 84 * blk + 80;
    const int kw = (int)k0 + 64 * q;  // the quarter's first weight (and activation) in the row
    const int swz = (8 * q) & 0x30;   // act_swz_q of the run's chunks (k0 is a multiple of 1024)
    const uint32_t m0 = 0x03030303u << (4 * p), m1 = m0 << 2;  // shifts 2 (2 p) and 2 (2 p + 1)
    const XView& x = xv[0];
    const int8_t* const xq0 = x.qs + hi * x.qs_tok + kw;
    const float* const xd0 = x.d + hi * x.d_tok + (kw >> 8);
    const int16_t* const xs0 = x.bs + hi * x.bs_tok + (kw >> 4);
#pragma unroll
    for (int k = 0; k < RPW / 2; ++k) {
        const uint8_t* row = hi ? rp[2 * k + 1] : rp[2 * k];
        const int8_t* xq = xq0 + 2 * k * x.qs_tok;
        const float dx = xd0[2 * k * x.d_tok];
        const int2 bs = *(const int2*)(xs0 + 2 * k * x.bs_tok);
        const uint32_t* qw = (const uint32_t*)(row + woff);
        uint32_t w[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) w[i] = qw[i];
        const uint32_t sw = *(const uint32_t*)(row + soff);
        const float2 dd = __half22float2(*(const __half2*)(row + doff));
        int dot[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {  // chunk c: sub-block 4 p + c, weights 16 (c & 1) .. of shift 2 (2 p + c / 2)
            const int4 x4 = *(const int4*)(xq + ((16 * c) ^ swz));
            const uint32_t m = c < 2 ? m0 : m1;
            const int o = 4 * (c & 1);
            int s = dp4a_us((int)(w[o] & m), x4.x, 0);
            s = dp4a_us((int)(w[o + 1] & m), x4.y, s);
            s = dp4a_us((int)(w[o + 2] & m), x4.z, s);
            dot[c] = dp4a_us((int)(w[o + 3] & m), x4.w, s);
        }
        const uint32_t sc = sw & 0x0f0f0f0fu, mn = (sw >> 4) & 0x0f0f0f0fu;
        const int a = (int)__byte_perm(sc, 0, 0x4440) * dot[0] + (int)__byte_perm(sc, 0, 0x4441) * dot[1];
        const int b = (int)__byte_perm(sc, 0, 0x4442) * dot[2] + (int)(sc >> 24) * dot[3];
        const int isum = (4 * a + b) >> (4 * p + 2);  // a: 16^p times the values' sum, b: 4 * 16^p times
        const int msum = __dp2a_hi(bs.y, (int)mn, __dp2a_lo(bs.x, (int)mn, 0));
        acc[2 * k][0] = fmaf(-(dd.y * dx), (float)msum, fmaf(dd.x * dx, (float)isum, acc[2 * k][0]));
    }
}

// Whether stage_dot takes an IQ2_XXS stage by pairs of groups (iq2_pair_dot): the routed gate+up's whole stages
// of 2048 weights (one token; its gate and up rows against the same activations, laid out by kSwzQuarters).
template <int T, int SPS, int NB, bool SHARED_X, bool FULL>
constexpr bool iq2_pairs() {
    return T == TYPE_IQ2_XXS && SPS == 2 && NB == 1 && SHARED_X && FULL;
}

// An IQ2_XXS stage by pairs: lane l takes groups 2 l and 2 l + 1 (weights 64 l .. 64 l + 63, one block's) of each
// row, where a lane per group (decode_unit, groups l and l + 32) took two blocks. The two groups share the block's
// d, the activations' scale and one f32 step (their integer sums meet first), and their 16 bytes are five words
// and four funnel shifts instead of six and four. Activations: the run of 64 by act_swz_q, as q2k_quarter_dot's.
template <int RPW, bool LANES>
__device__ __forceinline__ void iq2_pair_dot(const uint8_t* const (&rp)[RPW], int live, int lane, int64_t k0,
                                             const XView* xv, float (&acc)[RPW][1], const uint32_t* tab) {
    const int kw = (int)k0 + 64 * lane;  // the pair's first weight in the row
    const int swz = (8 * lane) & 0x30;   // act_swz_q (k0 is a multiple of 2048)
    const int8_t* const xq = xv[0].qs + kw;
    const float dx = xv[0].d[kw >> 8];
    // The block's d at boff, the pair's 16 bytes from goff: read from the aligned word at or below (rows start
    // 16-byte aligned: FULL), funnel-shifted right by sh bits.
    const int boff = 66 * (lane >> 2), goff = boff + 2 + 16 * (lane & 3), sh = 8 * (goff & 3);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        if (r >= live) break;
        const uint32_t* wp = (const uint32_t*)(rp[r] + (goff & ~3));
        uint32_t w[5];
#pragma unroll
        for (int i = 0; i < 5; ++i) w[i] = wp[i];
        int sum = 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int q[8];
            const int isc = iq2_group<LANES>(__funnelshift_r(w[2 * h], w[2 * h + 1], sh),
                                             __funnelshift_r(w[2 * h + 1], w[2 * h + 2], sh), LANES ? tab + lane : tab,
                                             q);
            sum += isc * dot8(q, xq, (32 * h) ^ swz);  // group h: chunks 2 h, 2 h + 1 of the run
        }
        acc[r][0] = fmaf(f16_at(rp[r] + boff) * 0.125f * dx, (float)sum, acc[r][0]);
    }
}

// Computes one stage: rows rp[r] (staged bytes of weights k0 .. k0 + Stage::weights of each row, r < live)
// against the activations of NB tokens (n_tok real), adding into acc. Weights past `cols` are skipped. xv[0] serves
// every row when SHARED_X (a product: one activation load feeds RPW rows), else row r reads xv[r] (the routed
// experts of one output, each against its own mid row). FULL: the stage lies inside the row (no weight past cols).
template <int T, int SPS, int NB, int RPW, bool SHARED_X, bool LANES, bool FULL = false>
__device__ __forceinline__ void stage_dot(const uint8_t* const (&rp)[RPW], int live, int lane, int64_t k0,
                                          int64_t cols, const XView* xv, int n_tok, float (&acc)[RPW][NB],
                                          const uint32_t* tab) {
    if constexpr (T == TYPE_F32 || T == TYPE_F16 || T == TYPE_BF16) {
        // Float weights: lane i takes weights 8 i .. 8 i + 7 of each 256-weight span, so that a warp's weight and
        // activation loads are contiguous (a 32-weight unit per lane would put lanes 128 bytes apart in the
        // activations: 8-way bank conflicts).
        constexpr int bpw = WT<T>::bb;  // bytes per weight
#pragma unroll
        for (int sp = 0; sp < 4 * SPS; ++sp) {
            const int wi = 256 * sp + 8 * lane;
            const int64_t kw = k0 + wi;
            if (kw >= cols) continue;
            float wf[RPW][8];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                if (r >= live) break;
                if constexpr (T == TYPE_F32) {
                    const float4* p = (const float4*)(rp[r] + bpw * wi);
                    const float4 a = p[0], b = p[1];
                    wf[r][0] = a.x, wf[r][1] = a.y, wf[r][2] = a.z, wf[r][3] = a.w;
                    wf[r][4] = b.x, wf[r][5] = b.y, wf[r][6] = b.z, wf[r][7] = b.w;
                } else {
                    const uint4 raw = *(const uint4*)(rp[r] + bpw * wi);
                    const uint32_t h[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        if constexpr (T == TYPE_F16) {
                            const float2 f = __half22float2(*(const __half2*)&h[i]);
                            wf[r][2 * i] = f.x, wf[r][2 * i + 1] = f.y;
                        } else {
                            wf[r][2 * i] = __uint_as_float(h[i] << 16);
                            wf[r][2 * i + 1] = __uint_as_float(h[i] & 0xffff0000u);
                        }
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < NB; ++t) {
                if (t >= n_tok) break;
                if (SHARED_X && xv[0].xh) {  // f16 activations: one 16-byte load feeds every row
                    const uint4 raw = *(const uint4*)(xv[0].xh + t * xv[0].xf_tok + kw);
                    const uint32_t h[4] = {raw.x, raw.y, raw.z, raw.w};
                    float xf[8];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float2 f = __half22float2(*(const __half2*)&h[i]);
                        xf[2 * i] = f.x, xf[2 * i + 1] = f.y;
                    }
#pragma unroll
                    for (int r = 0; r < RPW; ++r) {
                        if (r >= live) break;
                        acc[r][t] += dot8f(wf[r], xf);
                    }
                    continue;
                }
#pragma unroll
                for (int r = 0; r < RPW; ++r) {
                    if (r >= live) break;
                    const XView& x = xv[SHARED_X ? 0 : r];
                    acc[r][t] += dot8f(wf[r], x.xf + t * x.xf_tok + kw);
                }
            }
        }
    } else if constexpr (q2k_quarters<T, SPS, NB, RPW, SHARED_X, FULL>()) {
        q2k_quarter_dot<RPW>(rp, lane, k0, xv, acc);
    } else if constexpr (iq2_pairs<T, SPS, NB, SHARED_X, FULL>()) {
        iq2_pair_dot<RPW, LANES>(rp, live, lane, k0, xv, acc, tab);
    } else {
        const int xh = act_half(lane);
        UnitAt at0[RPW];  // lane's first unit of each row (IQ2_XXS)
#pragma unroll
        for (int r = 0; r < RPW; ++r) at0[r] = unit_at<T == TYPE_IQ2_XXS ? T : TYPE_Q2_K, FULL>(rp[r], lane);
#pragma unroll
        for (int j = 0; j < SPS; ++j) {
            const int u = lane + 32 * j;
            const int64_t kw = k0 + 32 * u;
            if (!FULL && kw >= cols) continue;
            // Quantized weights: decode the unit of each row into 8 words of bytes with its scales, then 8 dp4a
            // per token.
            int q[RPW][8];
            float dw[RPW], dm[RPW];
            int isc[RPW], imn[RPW];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                if (r >= live) break;
                // IQ2_XXS steps from the lane's first unit of the stage; Q8_0 places each unit (stepping took its
                // one-token product from 207 to 225 instructions per stage)
                const UnitAt at = T == TYPE_IQ2_XXS ? unit_step<T>(at0[r], j) : unit_at<T>(rp[r], u);
                decode_unit<T, LANES, true>(rp[r], u, at, LANES ? tab + lane : tab, q[r], dw[r], dm[r], isc[r],
                                            imn[r]);
            }
#pragma unroll
            for (int t = 0; t < NB; ++t) {
                if (t >= n_tok) break;
#pragma unroll
                for (int r = 0; r < RPW; ++r) {
                    if (r >= live) break;
                    const XView& x = xv[SHARED_X ? 0 : r];
                    const int8_t* xq = x.qs + t * x.qs_tok + kw;
                    if constexpr (T == TYPE_Q8_0) {
                        const float dx = x.d[t * x.d_tok + kw / 32];
                        acc[r][t] = fmaf(dw[r] * dx, (float)dot8(q[r], xq, xh), acc[r][t]);
                    } else if constexpr (T == TYPE_Q4_K) {
                        const float dx = x.d[t * x.d_tok + kw / 256];
                        const int16_t* bsp = x.bs + t * x.bs_tok + kw / 16;
                        const int bsum = bsp[0] + bsp[1];
                        acc[r][t] += fmaf(dw[r] * dx, (float)(isc[r] * dot8(q[r], xq, xh)),
                                          -(dm[r] * dx) * (float)(imn[r] * bsum));
                    } else if constexpr (T == TYPE_Q2_K) {
                        const float dx = x.d[t * x.d_tok + kw / 256];
                        const int16_t* bsp = x.bs + t * x.bs_tok + kw / 16;
                        const int2 h = dot8_halves(q[r], xq, xh);  // the values in place: 4^(u & 3) times
                        const int isum = ((isc[r] & 15) * h.x + (imn[r] & 15) * h.y) >> (2 * (u & 3));
                        const int msum = (isc[r] >> 4) * bsp[0] + (imn[r] >> 4) * bsp[1];
                        acc[r][t] += fmaf(dw[r] * dx, (float)isum, -(dm[r] * dx) * (float)msum);
                    } else {
                        const float dx = x.d[t * x.d_tok + kw / 256];
                        acc[r][t] = fmaf(dw[r] * dx, (float)(isc[r] * dot8(q[r], xq, xh)), acc[r][t]);
                    }
                }
            }
        }
    }
}

// ---- the per-warp stream ---------------------------------------------------------------------------------------

// Where step `st` of row set `set` reads: the RPW rows' byte ranges (len bytes each, from weight k0 of the row;
// rows r >= live are not read) and which activation segment (seg) they meet.
template <int RPW>
struct Src {
    const uint8_t* p[RPW];
    int len, live, seg;
    int64_t k0;
};

// Copies bytes [src, src + len) to shared address dst + (src & 15), with 16-byte cp.async from the boundary below;
// the range spans at most 32 * PER_LANE pieces (straight-line predicated copies, no loop bookkeeping). FULL: src is
// 16-byte aligned and len is FULL (a constant).
template <int PER_LANE, int FULL = 0>
__device__ __forceinline__ void copy_range(uint32_t dst, const uint8_t* src, int len, int lane, uint64_t policy) {
    const uint32_t off = FULL ? 0 : (uint32_t)(uintptr_t)src & 15;
    const uint8_t* a0 = src - off + 16 * lane;
    const int n16 = FULL ? FULL / 16 : (int)(off + len + 15) >> 4;
    dst += 16 * lane;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k)
        if (lane + 32 * k < n16) cp_async16_stream(dst + 512 * k, a0 + 512 * k, policy);
}

// Copies n rows of quantized activations (act_bytes<T>(n, cols), the CPU's order) from global to shared memory for
// stage_dot (the qs plane by act_place<SWZ>) with every thread of the block, as one more cp.async group.
template <int T, int SWZ = kSwzUnits>
__device__ __forceinline__ void copy_act(uint8_t* dst, const uint8_t* src, int n, int64_t cols) {
    const int64_t bytes = act_bytes<T>(n, cols), qs = n * cols;
    for (int64_t i = 16 * threadIdx.x; i < bytes; i += 16 * blockDim.x) {
        int64_t to = i;
        if (i < qs) {  // rows of whole 256-value blocks start at a multiple of 256 (bit 7 of the offset is the row's;
                       // kSwzQuarters: of 512, bits 7 and 8)
            const int64_t r = WT<T>::xb == 256 ? 0 : (int)i / (int)cols;
            to = r * cols + act_place<SWZ>(i - r * cols);
        }
        cp_async16(dst + to, src + i);
    }
    cp_async_commit();
}

// One warp's pipeline over n_sets row sets of `steps` stages each. plan(set, st) -> Src<RPW>; xview(seg) -> the
// XView(s) the stage meets (one, or RPW unless SHARED_X); flush(set, acc) after the last step of each set (called
// by all lanes, also when steps == 0). FULL: every stage is a whole G::bytes from a 16-byte aligned address (the
// kernel checked row_bytes and the weights' alignment): the copies and the decode need no offsets or bounds, and
// the compute side uses only the plan's k0, live and seg (the compiler drops the rest).
template <int T, int SPS, int NB, int RPW, bool SHARED_X, class Plan, bool FULL = false>
struct Streamer {
    using G = Stage<T, SPS>;
    static constexpr int stage_bytes = RPW * G::slot;
    uint8_t* ring;
    uint32_t ring_s;  // the ring's shared-memory address
    int lane, n_sets, steps;
    Plan plan;
    int is_set, is_st, is_slot;  // the next stage to issue, and its ring slot
    uint64_t policy;             // the copies' L2 eviction priority (cp_async16_stream)

    __device__ __forceinline__ void issue() {
        if (is_set < n_sets) {
            const Src<RPW> s = plan(is_set, is_st);
            const uint32_t d = ring_s + is_slot * stage_bytes;
#pragma unroll
            for (int r = 0; r < RPW; ++r)
                if (r < s.live)
                    copy_range<(G::slot / 16 + 31) / 32, FULL ? G::bytes : 0>(d + r * G::slot, s.p[r], s.len, lane,
                                                                             policy);
            if (++is_st == steps) is_st = 0, ++is_set;
        }
        is_slot = is_slot == kDepth - 1 ? 0 : is_slot + 1;
        cp_async_commit();  // an empty group past the end keeps the wait count uniform
    }

    // The first kDepth - 1 stages; may run before the kernel's dependency wait when plan reads no activations.
    __device__ __forceinline__ void prologue() {
#pragma unroll
        for (int i = 0; i < kDepth - 1; ++i) issue();
    }

    // tab: the IQ2_XXS tables in shared memory, one copy per lane with LANES (load_tables).
    template <bool LANES = false, class XV, class Flush>
    __device__ __forceinline__ void run(int64_t cols, int n_tok, const uint32_t* tab, XV xview, Flush flush) {
        int slot = 0;
        for (int set = 0; set < n_sets; ++set) {
            float acc[RPW][NB];
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int t = 0; t < NB; ++t) acc[r][t] = 0.0f;
            for (int st = 0; st < steps; ++st) {
                issue();
                cp_async_wait<kDepth - 1>();
                __syncwarp();
                const Src<RPW> s = plan(set, st);
                const uint8_t* rp[RPW];
                uint8_t* base = ring + slot * stage_bytes;
#pragma unroll
                for (int r = 0; r < RPW; ++r) rp[r] = base + r * G::slot + (FULL ? 0 : (uintptr_t)s.p[r] & 15);
                stage_dot<T, SPS, NB, RPW, SHARED_X, LANES, FULL>(rp, s.live, lane, s.k0, cols, xview(s.seg), n_tok,
                                                                  acc, tab);
                __syncwarp();  // every lane is done with this stage before it is refilled
                slot = slot == kDepth - 1 ? 0 : slot + 1;
            }
            flush(set, acc);
        }
        cp_async_wait<0>();
    }
};

// A warp's stream; with steps == 0 nothing is issued (flush still runs once per set). policy: l2_evict_first where
// each weight is read once, else l2_evict_normal.
template <int T, int SPS, int NB, int RPW, bool SHARED_X, bool FULL = false, class Plan>
__device__ __forceinline__ Streamer<T, SPS, NB, RPW, SHARED_X, Plan, FULL> make_streamer(uint8_t* ring, int lane,
                                                                                         int n_sets, int steps,
                                                                                         Plan plan, uint64_t policy) {
    return Streamer<T, SPS, NB, RPW, SHARED_X, Plan, FULL>{ring, (uint32_t)__cvta_generic_to_shared(ring), lane,
                                                           n_sets, steps, plan, steps == 0 ? n_sets : 0, 0, 0,
                                                           policy};
}

// Copies the IQ2_XXS tables into shared memory, compact or one copy per lane (all threads of the block; a barrier
// must follow). A thread loads its words (w and w + blockDim.x: both loads in flight before any store) and, per
// lane, writes each to its 32 places with eight 16-byte stores, lane i starting at the (i mod 8)-th so that a
// warp's stores fall on every bank. (A loop of one word per store took every thread 32 dependent loads: ~7 us of
// the routed gate+up launch's 30 when timed alone.)
template <int T, bool LANES = false>
__device__ __forceinline__ void load_tables(uint32_t* dst, const uint32_t* src) {
    if constexpr (T == TYPE_IQ2_XXS) {
        for (int w0 = threadIdx.x; w0 < kIq2TableWords; w0 += 2 * blockDim.x) {
            const int w1 = w0 + blockDim.x;
            const uint32_t v[2] = {src[w0], w1 < kIq2TableWords ? src[w1] : 0u};
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const int w = k ? w1 : w0;
                if (w >= kIq2TableWords) break;
                if constexpr (LANES) {
                    uint4* places = (uint4*)(dst + 32 * w);
#pragma unroll
                    for (int c = 0; c < 8; ++c) places[(c + threadIdx.x) & 7] = make_uint4(v[k], v[k], v[k], v[k]);
                } else {
                    dst[w] = v[k];
                }
            }
        }
    }
}
template <int T, bool LANES = false>
constexpr size_t table_bytes() {
    return T != TYPE_IQ2_XXS ? 0 : LANES ? 32 * kIq2TableWords * sizeof(uint32_t) + kLanesAlign
                                  : kIq2TableWords * sizeof(uint32_t);
}
// Where the per-lane tables go in the table_bytes<T, true>() at p: the first 16 KB boundary of the shared window.
__device__ __forceinline__ uint32_t* lanes_tables(uint8_t* p) {
    return (uint32_t*)(p + ((0u - (uint32_t)__cvta_generic_to_shared(p)) & (kLanesAlign - 1)));
}

// e = Op<T>::run(args...) for a runtime type code T; false (e untouched) for an unsupported code.
template <template <int> class Op, class... A>
bool by_type(int type, cudaError_t& e, A&&... args) {
    switch (type) {
        case TYPE_F32: e = Op<TYPE_F32>::run(args...); return true;
        case TYPE_F16: e = Op<TYPE_F16>::run(args...); return true;
        case TYPE_BF16: e = Op<TYPE_BF16>::run(args...); return true;
        case TYPE_Q8_0: e = Op<TYPE_Q8_0>::run(args...); return true;
        case TYPE_Q2_K: e = Op<TYPE_Q2_K>::run(args...); return true;
        case TYPE_Q4_K: e = Op<TYPE_Q4_K>::run(args...); return true;
        case TYPE_IQ2_XXS: e = Op<TYPE_IQ2_XXS>::run(args...); return true;
        default: return false;
    }
}

template <int T>
struct ActBytes {
    static cudaError_t run(size_t* out, int n, int64_t cols) {
        *out = act_bytes<T>(n, cols);
        return cudaSuccess;
    }
};

// act_bytes for a runtime type code: the bytes of n quantized activation rows of `cols` values (0 for the float
// types and for unknown codes) - the size of one group of a workspace that quantize_groups fills.
inline size_t act_bytes_of(int type, int n, int64_t cols) {
    size_t bytes = 0;
    cudaError_t e;
    by_type<ActBytes>(type, e, &bytes, n, cols);
    return bytes;
}

}  // namespace ds4::cuda
