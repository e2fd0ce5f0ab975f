// Tensor-core products for prefill: many activation rows against quantized weights (ds4_cuda_gemm), and the
// routed experts of many tokens as one grouped product per matrix over the tokens sorted by expert
// (ds4_cuda_moe_grouped).
//
// Numerics are the decode kernels' (qdot.cuh): activations quantized to the CPU's act8 blocks (Q8_0 for Q8_0
// weights, Q8_K for the K and IQ2 types), weights decoded to exact signed bytes, exact integer sums per 32
// weights, f32 from there on. Only the grouping of the f32 sums differs: Q8_0 adds each 32-weight block's scaled
// sum; the others add each 256-weight super-block's integer sum (Q2_K: the scale folded into the bytes; Q4_K,
// IQ2_XXS: times the sub-block scale in integers) once, minus its min term.
//
// A block of 4 warps computes a tile of 64 weight rows x BN activation rows (BN 16, 32 or 64), 256 bytes of each
// weight row's K per stage. Each stage, its threads copy the tile's raw weight bytes and int8 activations into
// shared memory with cp.async (double-buffered: the next stage's copies fly while this one computes), decode the
// weights into a 64 x 256 int8 tile with per-row scales, and the warps run int8 mma.sync m16n8k32 (one per 32
// weights, the sub-block of every type) on fragments read straight from the tiles (rows padded by 16 bytes:
// conflict-free). IQ2_XXS and Q2_K (reg_a) skip the int8 tile: each warp decodes its 16 rows' A fragments
// straight from the staged raw rows and multiplies them by all of the tile's columns. The K types' min terms (sum
// over 16-weight sub-blocks of min x activation sum) are one f16 mma m16n8k16 per stage: mins (< 64) and
// activation sums (|.| <= 2032) are exact in f16 and their products sum exactly in f32. F16 weights (the router,
// compressors and indexer) take the same path with 128 f16 weights per stage and m16n8k16 against the activations
// split into two f16 parts (high, and the rounding of the rest: about 22 bits, scaled per row by a power of two),
// both products summed in f32.
//
// The grouped MoE: a one-block kernel sorts the (token, slot) pairs by expert (counts, offsets, each pair's
// position; order within an expert does not matter, every output element is computed alone) and lists tiles of
// up to BN (16, 32 or 64, by the mean pairs per expert) pairs of one expert. gate and up are then two grouped
// products over those tiles (activation rows gathered by pair), SwiGLU times the routing weight writes the mid
// rows in sorted order, down is a third grouped product, and a last kernel adds each token's n_used rows in slot
// order (no atomics: the same bits every run).
#include "qdot.cuh"

namespace ds4::cuda {
namespace {

constexpr int kBM = 64;                 // weight rows per block tile (128 measured no faster; 8 warps per
                                        // block for tiles of 64 rows: 1-3% on the dense products)
constexpr int kGWarps = 4;
constexpr int kGThreads = 32 * kGWarps;
constexpr int kKB = 256;                // bytes of a tile row per stage: 256 int8 weights, or 128 f16
constexpr int kPad = kKB + 16;          // tile row stride in bytes

// Activation rows per tile (BN: 16, 32 or 64). A dense product takes 64, halved while that would leave SMs
// without a block (products of few rows). The grouped MoE's tiles hold up to BN pairs of one expert (moe_bn, from
// the mean pairs per expert): a decoded weight fragment serves all of them, and a tile's 8-column blocks with no
// pair skip their loads and mmas. Measured (H200, 256 experts, 6 per token): 512 tokens (12 pairs per expert) 16
// / 32 / 64 wide: 2,279 / 2,136 / 2,437 us; 1024 tokens: 3,950 / 2,645 / 2,928; 2048: 6,994 / 4,976 / 4,000.
int dense_bn(int64_t n_tok, int64_t row_tiles) {
    int bn = 64;
    while (bn > 16 && ceil_div(n_tok, bn) * row_tiles < props().sms) bn /= 2;
    return bn;
}

template <int T>
constexpr int ks() {  // weights of K per stage
    return T == TYPE_F16 ? kKB / 2 : kKB;
}
template <int T>
constexpr int sb_bytes() {  // raw bytes of a stage of a row: Q8_0 272, Q2_K 84, Q4_K 144, IQ2_XXS 66, F16 256
    return ks<T>() / WT<T>::bw * WT<T>::bb;
}
template <int T>
constexpr bool has_min() {
    return T == TYPE_Q2_K || T == TYPE_Q4_K;
}
// IQ2_XXS and Q2_K (the q2 file's routed experts) are decoded straight into the mma's A fragments, each warp
// owning 16 weight rows and all of the tile's activation rows; the other types go through an int8 tile.
template <int T>
constexpr bool reg_a() {
    return T == TYPE_IQ2_XXS || T == TYPE_Q2_K;
}
template <int T>
constexpr int raw_slot() {  // a row's raw stage: bytes + alignment offset (+ decode_unit's over-read for the int8
                            // tile's types), in an odd number of 16-byte pieces (a fragment's 8 rows then fall in
                            // distinct banks)
    constexpr int pieces = (sb_bytes<T>() + (reg_a<T>() ? 15 : 32) + 15) / 16;
    return 16 * (pieces | 1);
}
template <int T>
constexpr bool gemm_type() {
    return T == TYPE_Q8_0 || T == TYPE_Q2_K || T == TYPE_Q4_K || T == TYPE_IQ2_XXS || T == TYPE_F16;
}

struct GemmArgs {
    float* y;
    int64_t y_stride;            // y row of output row n (dense: activation row n; grouped: sorted pair n)
    const uint8_t* w;
    int64_t rows, cols, row_bytes;
    int64_t w_group;             // bytes between groups' (dense) or experts' (grouped) matrices
    const uint8_t* xq;           // quantized activations: x_rows rows of x_width values, act_view planes
    int64_t x_rows, x_width;
    int n_tok;                   // dense: activation rows
    const int32_t* tiles;        // grouped: (expert, first row, count) per tile; null for a dense product
    const int32_t* n_tiles;
    const int32_t* gather;       // grouped: activation row of output row n is gather[n] / gather_div (null: n)
    int gather_div;
    const uint32_t* tab;
};

// Shared-memory layout of one block (offsets in bytes). The reg_a types keep no int8 tile and no per-row tables
// (their scales come from the raw rows), and IQ2_XXS no activation sums: 51-54 KB at BN 64, four blocks per SM
// (66-68 KB, three, before).
template <int T, int BN>
struct GemmSmem {
    static constexpr bool kTile = !reg_a<T>();
    static constexpr int bdw = WT<T>::xb == 32 ? 8 : 1;           // activation scales per row and stage
    static constexpr size_t tab = 0;
    static constexpr size_t raw = table_bytes<T>();
    static constexpr size_t a = raw + 2 * kBM * raw_slot<T>();
    static constexpr size_t asc = a + (kTile ? kBM * kPad : 0);    // float [kBM][8]: Q8_0 per block; else d, dmin
    static constexpr size_t aisc = asc + (kTile ? kBM * 8 * 4 : 0);    // int [kBM][8]: sub-block scales (Q4_K)
    static constexpr size_t amin = aisc + (kTile ? kBM * 8 * 4 : 0);   // half [kBM][16]: 16-weight mins (Q4_K)
    static constexpr size_t bq = amin + (kTile ? kBM * 16 * 2 : 0);    // int8 [2][BN][kPad]
    static constexpr size_t bd = bq + 2 * BN * kPad;                   // float [2][BN][bdw]
    static constexpr size_t bbs = bd + 2 * BN * bdw * 4;               // f16 [2][BN][16]: activation sums per 16
    static constexpr size_t blo = bbs + (has_min<T>() ? 2 * BN * 16 * 2 : 0);  // F16: f16 [2][BN][kPad / 2], low
    static constexpr size_t xr = blo + (T == TYPE_F16 ? 2 * BN * kPad : 0);  // int [BN]: each column's activation row
    static constexpr size_t bytes = xr + 4 * BN;
};

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ uint32_t half2_bits(int lo, int hi) {
    const __half2 h = __halves2half2(__int2half_rn(lo), __int2half_rn(hi));
    return *(const uint32_t*)&h;
}

template <int T, int BN>
__global__ void __launch_bounds__(kGThreads) gemm_kernel(GemmArgs a) {
    using S = GemmSmem<T, BN>;
    constexpr int xb = WT<T>::xb, SB = sb_bytes<T>(), RS = raw_slot<T>(), KS = ks<T>();
    constexpr bool F16 = T == TYPE_F16;
    constexpr int NC = (SB + 15 + 15) / 16;          // 16-byte pieces of a row's stage, at most
    // IQ2_XXS and Q2_K (reg_a): decoded straight into the A fragments (registers) from the staged raw rows, no
    // int8 tile (its shared-memory stores and loads were most of these kernels' traffic), each warp owning 16 rows
    // and all BN columns, so a decoded fragment serves BN / 8 mmas. IQ2_XXS: one lookup pair per grid point, lane
    // t of a quad taking point t (the activations' PAIRS order); Q2_K words are a shift, a mask and the sub-block
    // scale. The other types: warps 2 x 2 of 32 x BN / 2 (BN >= 32), or 4 x 1 of 16 x 16.
    constexpr bool kRegA = reg_a<T>();
    constexpr int WN = BN >= 32 && !kRegA ? 2 : 1, WM = kGWarps / WN;
    constexpr int MI = kBM / (16 * WM), NI = BN / (8 * WN);
    extern __shared__ __align__(16) uint8_t smem[];
    uint32_t* tab = (uint32_t*)(smem + S::tab);
    uint8_t* raw = smem + S::raw;
    int8_t* A = (int8_t*)(smem + S::a);
    float* asc = (float*)(smem + S::asc);
    int* aisc = (int*)(smem + S::aisc);
    __half* amin = (__half*)(smem + S::amin);
    int8_t* Bq = (int8_t*)(smem + S::bq);
    float* Bd = (float*)(smem + S::bd);
    int16_t* Bbs = (int16_t*)(smem + S::bbs);
    uint8_t* Blo = smem + S::blo;
    int* xr_of = (int*)(smem + S::xr);

    pdl_trigger();
    pdl_wait();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;

    // This block's tile: weight rows row0.., output rows first .. first + count - 1, and the matrix.
    int64_t first, row0;
    int count, xcol = 0;
    const uint8_t* wm = a.w;
    float* y = a.y;
    if (a.tiles) {
        const int tile = blockIdx.y;
        if (tile >= *a.n_tiles) return;
        wm += (int64_t)a.tiles[3 * tile] * a.w_group;
        first = a.tiles[3 * tile + 1];
        count = a.tiles[3 * tile + 2];
        row0 = (int64_t)blockIdx.x * kBM;
    } else {
        first = (int64_t)blockIdx.x * BN;
        count = (int)min((int64_t)BN, a.n_tok - first);
        row0 = (int64_t)blockIdx.y * kBM;
        wm += blockIdx.z * a.w_group;
        xcol = blockIdx.z * (int)a.cols;
        y += blockIdx.z * a.rows;
    }
    const int64_t last_row = a.rows - 1;
    load_tables<T>(tab, a.tab);
    // Each column's activation row, gathered once (columns past count repeat the last row).
    for (int n = tid; n < BN; n += kGThreads) {
        const int64_t r = first + min(n, count - 1);
        xr_of[n] = (int)(a.gather ? a.gather[r] / a.gather_div : r);
    }
    // Columns of the 8-column mma blocks that hold a real one: only these are staged (a grouped tile is often far
    // from full). The reg_a types skip the other blocks' mmas too; the int8-tile path multiplies them (stale
    // shared memory) rather than branch inside its unrolled loops, and never stores their results.
    const int live_cols = min(BN, (count + 7) & ~7);
    __syncthreads();

    // Activation planes (act_view; F16: f16 high and low parts, then a power-of-two scale per row) and this
    // tile's rows.
    const int64_t plane = a.x_rows * a.x_width * (F16 ? 2 : 1);  // bytes of the first plane
    const uint8_t* xqs = a.xq;
    const float* xd = (const float*)(a.xq + (F16 ? 2 : 1) * plane);
    const int16_t* xbs = (const int16_t*)(a.xq + plane + 4 * a.x_rows * (a.x_width / (xb ? xb : 1)));
    // Byte offset in the matrix of stage kb of the tile's row r (32 bits: the host keeps matrices under 4 GiB).
    auto woff = [&](int r, int kb) -> uint32_t {
        return (uint32_t)min(row0 + r, last_row) * (uint32_t)a.row_bytes + (uint32_t)(kb * SB);
    };

    // reg_a: the weight pieces this thread copies at every stage (kBM rows x NC pieces over the block's threads),
    // each one's row (16 r + piece c; -1 past the tile) and the row's offset in the matrix, found once (the copy
    // loop's divisions and 64-bit row clamps had been ~10% of the stage's instructions). The other types keep the
    // loop: their kernels have no registers to spare.
    constexpr int kWPieces = kRegA ? (kBM * NC + kGThreads - 1) / kGThreads : 1;
    int w_rc[kWPieces];
    uint32_t w_at[kWPieces];
#pragma unroll
    for (int j = 0; j < kWPieces; ++j) {
        const int i = tid + j * kGThreads, r = i / NC;
        w_rc[j] = i < kBM * NC ? 16 * r + (i - r * NC) : -1;
        w_at[j] = woff(r, 0);
    }
    auto load = [&](int buf, int kb) {
        // weights: kBM rows x SB bytes from weight kb * 256, 16-byte pieces from the boundary below
        auto piece = [&](int r, int c, const uint8_t* src) {
            const uint32_t off = (uint32_t)(uintptr_t)src & 15;
            if (c < (int)((off + SB + 15) >> 4)) cp_async16(raw + (buf * kBM + r) * RS + 16 * c, src - off + 16 * c);
        };
        if constexpr (kRegA) {
#pragma unroll
            for (int j = 0; j < kWPieces; ++j)
                if (w_rc[j] >= 0) piece(w_rc[j] >> 4, w_rc[j] & 15, wm + w_at[j] + kb * SB);
        } else {
            for (int i = tid; i < kBM * NC; i += kGThreads) {
                const int r = i / NC;
                piece(r, i - r * NC, wm + woff(r, kb));
            }
        }
        // activations: BN rows of 256 bytes (int8, or the f16 high and low parts), their scales and (K types)
        // sums per 16
        const int64_t k0 = xcol + (int64_t)kb * KS;
        for (int i = tid; i < live_cols * 16; i += kGThreads) {
            const int n = i >> 4, c = i & 15;  // 32-bit offsets: the host keeps the activations under 4 GiB
            const uint32_t at = ((uint32_t)xr_of[n] * (uint32_t)a.x_width + (uint32_t)k0) * (F16 ? 2 : 1) + 16 * c;
            cp_async16(Bq + (buf * BN + n) * kPad + 16 * c, xqs + at);
            if constexpr (F16) cp_async16(Blo + (buf * BN + n) * kPad + 16 * c, xqs + plane + at);
        }
        constexpr int kPer = xb == 32 || has_min<T>() ? 8 : 1;  // copies per row: its scales, or its sums per 16
        for (int i = tid; i < live_cols * kPer; i += kGThreads) {
            const int n = i / kPer, c = i % kPer;
            const uint32_t xr = (uint32_t)xr_of[n], k = (uint32_t)k0;
            float* dd = Bd + (buf * BN + n) * S::bdw;
            if constexpr (F16) {
                cp_async4(dd, xd + xr);
            } else if constexpr (xb == 32) {
                cp_async4(dd + c, xd + (xr * (uint32_t)(a.x_width / 32) + k / 32 + c));
            } else {
                if (c == 0) cp_async4(dd, xd + (xr * (uint32_t)(a.x_width / 256) + k / 256));
                if constexpr (has_min<T>())
                    cp_async4(Bbs + (buf * BN + n) * 16 + 2 * c,
                              xbs + (xr * (uint32_t)(a.x_width / 16) + k / 16 + 2 * c));
            }
        }
    };

    // Decodes the stage's raw weights into the int8 tile and the per-row scales.
    auto decode = [&](int buf, int kb) {
        for (int i = tid; i < kBM * 8; i += kGThreads) {
            const int r = i >> 3, u = i & 7;
            const uint8_t* src = wm + woff(r, kb);
            const uint8_t* rp = raw + (buf * kBM + r) * RS + ((uintptr_t)src & 15);
            int4* dst = (int4*)(A + r * kPad + 32 * u);
            if constexpr (F16) {  // f16 weights as they are
                dst[0] = ((const int4*)rp)[2 * u];
                dst[1] = ((const int4*)rp)[2 * u + 1];
            } else {
                int q[8];
                float dw, dm;
                int isc, imn;
                decode_unit<T>(rp, u, unit_at<T>(rp, u), tab, q, dw, dm, isc, imn);
                if constexpr (T == TYPE_Q2_K) {
                    const int s0 = isc & 15, s1 = imn & 15;  // bytes <= 3 * 15: the products stay in their bytes
#pragma unroll
                    for (int k = 0; k < 4; ++k) q[k] *= s0, q[k + 4] *= s1;
                    amin[r * 16 + 2 * u] = __int2half_rn(isc >> 4);
                    amin[r * 16 + 2 * u + 1] = __int2half_rn(imn >> 4);
                } else if constexpr (T == TYPE_Q4_K) {
                    aisc[r * 8 + u] = isc;
                    amin[r * 16 + 2 * u] = amin[r * 16 + 2 * u + 1] = __int2half_rn(imn);
                } else if constexpr (T == TYPE_IQ2_XXS) {
                    aisc[r * 8 + u] = isc;
                }
                if constexpr (T == TYPE_Q8_0) {
                    asc[r * 8 + u] = dw;
                } else if (u == 0) {
                    asc[r * 8] = dw;
                    asc[r * 8 + 1] = dm;
                }
                dst[0] = make_int4(q[0], q[1], q[2], q[3]);
                dst[1] = make_int4(q[4], q[5], q[6], q[7]);
            }
        }
    };

    const int wrow = (warp / WN) * 16 * MI, wcol = (warp % WN) * 8 * NI;
    // Element e of this lane's accumulator fragment of tile (mi, ni) (mma's C layout): its row in the block's
    // weight tile and its activation column.
    auto c_row = [&](int mi, int e) { return wrow + 16 * mi + g + 8 * (e >> 1); };
    auto c_col = [&](int ni, int e) { return wcol + 8 * ni + 2 * t4 + (e & 1); };
    auto live = [&](int ni) { return wcol + 8 * ni < live_cols; };  // warp-uniform (the reg_a path's test)
    float acc[MI][NI][4] = {};

    const int nk = (int)(a.cols / KS);
    load(0, 0);
    cp_async_commit();
    for (int kb = 0; kb < nk; ++kb) {
        const int buf = kb & 1;
        if (kb + 1 < nk) {
            load(buf ^ 1, kb + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (!kRegA) decode(buf, kb);
        __syncthreads();

        const int8_t* bq = Bq + buf * BN * kPad;
        const float* bd = Bd + buf * BN * S::bdw;
        if constexpr (kRegA) {
            // This warp's rows g and g + 8 (h = 0, 1) as staged, their d (IQ2_XXS: / 8) and Q2_K's dmin; then all 8
            // A fragments of the stage decoded at once (the lookups in flight together), and each live 8-column
            // block multiplied through the stage and folded into acc (one liveness test per block and stage).
            const uint8_t* rr[2];
            float rdw[2], rdm[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = wrow + g + 8 * h;
                const uint8_t* src = wm + woff(r, kb);
                rr[h] = raw + (buf * kBM + r) * RS + ((uintptr_t)src & 15);
                if constexpr (T == TYPE_Q2_K) {
                    const float2 dd = __half22float2(*(const __half2*)(rr[h] + 80));
                    rdw[h] = dd.x, rdm[h] = dd.y;
                } else {
                    rdw[h] = f16_at(rr[h]) * 0.125f;
                }
            }
            uint32_t af[8][4], mf[4];
            int rsc[8][2];  // IQ2_XXS: the sub-block scale 2 s + 1 of rows g, g + 8 per group of 32
            const int s7 = 7 * t4;  // IQ2_XXS: where grid point t4's sign index lies in its group's aux word
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if constexpr (T == TYPE_Q2_K) {
                    // Lane (g, t): words t and 4 + t of unit c (sub-blocks 2c, 2c + 1), times their scales (bytes
                    // <= 3 * 15); the mins (the scale bytes' high nibbles) as f16 for the min term's mma.
                    const uint8_t* b = rr[h];
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        const uint32_t scs = *(const uint16_t*)(b + 2 * c);
                        const uint32_t* qp = (const uint32_t*)(b + 16 + 32 * (c >> 2));
                        const int shift = 2 * (c & 3);
                        af[c][h] = ((qp[t4] >> shift) & 0x03030303u) * (scs & 15);
                        af[c][2 + h] = ((qp[4 + t4] >> shift) & 0x03030303u) * ((scs >> 8) & 15);
                    }
                    const uint8_t* sc = b + 2 * t4;
                    mf[h] = half2_bits(sc[0] >> 4, sc[1] >> 4);
                    mf[2 + h] = half2_bits(sc[8] >> 4, sc[9] >> 4);
                } else {
                    // Lane (g, t) takes grid point t of group c whole: its selectors' low half gives fragment word
                    // t (weights 8 t .. 8 t + 3), its high half word 4 + t (8 t + 4 .. 8 t + 7), which is where
                    // the activations' PAIRS order (quantize_into) put those weights' partners.
                    const uint8_t* q = rr[h] + 2;  // the groups' 8-byte (grid, aux) pairs, maybe unaligned
                    const uint32_t mis = (uint32_t)((uintptr_t)q & 3), sh = 8 * mis;
                    const uint32_t* w = (const uint32_t*)(q - mis);
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        const uint32_t w0 = w[2 * c], w1 = w[2 * c + 1], w2 = w[2 * c + 2];
                        const uint32_t grid = __funnelshift_r(w0, w1, sh), aux = __funnelshift_r(w1, w2, sh);
                        const uint32_t sel = tab[__byte_perm(grid, 0, 0x4440 | t4)] + tab[256 + ((aux >> s7) & 127)];
                        af[c][h] = __byte_perm(kIq2Lo, kIq2Hi, sel);
                        af[c][2 + h] = __byte_perm(kIq2Lo, kIq2Hi, sel >> 16);
                        rsc[c][h] = 2 * (int)(aux >> 28) + 1;
                    }
                }
            }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                if (!live(ni)) break;
                // The int8 mma's B fragments (8 columns x 32 bytes of K per c): column block ni's rows at bytes
                // 16 m + 32 c give c's two registers (m = 0, 1) and c + 1's (m = 2, 3).
                const uint32_t bp = smem_addr(bq + (8 * ni + (lane & 7)) * kPad + 16 * (lane >> 3));
                int isum[4] = {0, 0, 0, 0};
                uint32_t bm[4];
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    if (c % 2 == 0) ldmatrix_x4(bm, bp + 32 * c);  // c's fragment and c + 1's
                    const uint32_t bf[2] = {bm[2 * (c % 2)], bm[2 * (c % 2) + 1]};
                    if constexpr (T == TYPE_Q2_K) {
                        mma_s8(isum, af[c], bf);
                    } else {
                        int ci[4];
                        mma_s8_new(ci, af[c], bf);
#pragma unroll
                        for (int e = 0; e < 4; ++e) isum[e] += ci[e] * rsc[c][e >> 1];
                    }
                }
                float msum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if constexpr (T == TYPE_Q2_K) {
                    const int16_t* p = Bbs + (buf * BN + 8 * ni + g) * 16 + 2 * t4;  // f16 sums (quantize_into)
                    const uint32_t bf[2] = {*(const uint32_t*)p, *(const uint32_t*)(p + 8)};
                    mma_f16(msum, mf, bf);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float dx = bd[c_col(ni, e) * S::bdw];
                    float v = fmaf(rdw[e >> 1] * dx, (float)isum[e], acc[0][ni][e]);
                    if constexpr (T == TYPE_Q2_K) v = fmaf(-(rdm[e >> 1] * dx), msum[e], v);
                    acc[0][ni][e] = v;
                }
            }
        } else {
            int isum[MI][NI][4] = {};  // the stage's integer sums (not Q8_0: its blocks are scaled one by one)
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                // A 16 x 32-byte fragment: 32 int8 (m16n8k32) or 16 f16 (m16n8k16) of K; the same bytes per lane
                uint32_t af[MI][4], bf[NI][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int8_t* p = A + (wrow + 16 * mi + g) * kPad + 32 * c + 4 * t4;
                    af[mi][0] = *(const uint32_t*)p;
                    af[mi][1] = *(const uint32_t*)(p + 8 * kPad);
                    af[mi][2] = *(const uint32_t*)(p + 16);
                    af[mi][3] = *(const uint32_t*)(p + 8 * kPad + 16);
                }
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    const int8_t* p = bq + (wcol + 8 * ni + g) * kPad + 32 * c + 4 * t4;
                    bf[ni][0] = *(const uint32_t*)p;
                    bf[ni][1] = *(const uint32_t*)(p + 16);
                }
                if constexpr (F16) {
                    uint32_t lo[NI][2];
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
                        const uint8_t* p = Blo + (buf * BN + wcol + 8 * ni + g) * kPad + 32 * c + 4 * t4;
                        lo[ni][0] = *(const uint32_t*)p;
                        lo[ni][1] = *(const uint32_t*)(p + 16);
                    }
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                        for (int ni = 0; ni < NI; ++ni) {
                            mma_f16(acc[mi][ni], af[mi], bf[ni]);
                            mma_f16(acc[mi][ni], af[mi], lo[ni]);
                        }
                } else {
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                        for (int ni = 0; ni < NI; ++ni) {
                            int ci[4];
                            mma_s8_new(ci, af[mi], bf[ni]);
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int row = c_row(mi, e), n = c_col(ni, e);
                                if constexpr (T == TYPE_Q8_0)
                                    acc[mi][ni][e] =
                                        fmaf(asc[row * 8 + c] * bd[n * S::bdw + c], (float)ci[e], acc[mi][ni][e]);
                                else
                                    isum[mi][ni][e] += ci[e] * aisc[row * 8 + c];
                            }
                        }
                }
            }
            if constexpr (T != TYPE_Q8_0 && !F16) {
                float msum[MI][NI][4] = {};
                if constexpr (has_min<T>()) {
                    const int16_t* bs = Bbs + buf * BN * 16;
                    uint32_t af[MI][4], bf[NI][2];
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi) {
                        const __half* p = amin + (wrow + 16 * mi + g) * 16 + 2 * t4;
                        af[mi][0] = *(const uint32_t*)p;
                        af[mi][1] = *(const uint32_t*)(p + 8 * 16);
                        af[mi][2] = *(const uint32_t*)(p + 8);
                        af[mi][3] = *(const uint32_t*)(p + 8 * 16 + 8);
                    }
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
                        const int16_t* p = bs + (wcol + 8 * ni + g) * 16 + 2 * t4;
                        bf[ni][0] = *(const uint32_t*)p;  // f16 sums (quantize_into)
                        bf[ni][1] = *(const uint32_t*)(p + 8);
                    }
#pragma unroll
                    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                        for (int ni = 0; ni < NI; ++ni) {
                            mma_f16(msum[mi][ni], af[mi], bf[ni]);
                        }
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int row = c_row(mi, e), n = c_col(ni, e);
                            const float dx = bd[n * S::bdw];
                            const float dw = asc[row * 8];
                            float v = fmaf(dw * dx, (float)isum[mi][ni][e], acc[mi][ni][e]);
                            if constexpr (has_min<T>()) {
                                const float dm = asc[row * 8 + 1];
                                v = fmaf(-(dm * dx), msum[mi][ni][e], v);
                            }
                            acc[mi][ni][e] = v;
                        }
                    }
            }
        }
        __syncthreads();  // the tiles are read before the next stage's copies and decode overwrite them
    }

#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t row = row0 + c_row(mi, e);
                const int n = c_col(ni, e);
                const float v = F16 ? acc[mi][ni][e] * Bd[(((nk - 1) & 1) * BN + n) * S::bdw] : acc[mi][ni][e];
                if (row < a.rows && n < count) y[(first + n) * a.y_stride + row] = v;
            }
}

template <int T, int BN>
cudaError_t gemm_launch(cudaStream_t s, const GemmArgs& a, dim3 grid) {
    auto kernel = gemm_kernel<T, BN>;
    const size_t smem = GemmSmem<T, BN>::bytes;
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    return launch(kernel, grid, dim3(kGThreads), smem, s, a);
}
// The widest tile of at most `bn` whose shared memory this device allows (64 needs 107 KB for Q8_0: more than the
// 99 KB of sm_86 / sm_89).
template <int T>
int fitting_bn(int bn) {
    while (bn > 16 && (bn == 64 ? GemmSmem<T, 64>::bytes : GemmSmem<T, 32>::bytes) > props().smem_optin) bn /= 2;
    return bn;
}
template <int T>
cudaError_t gemm_launch_bn(cudaStream_t s, const GemmArgs& a, int bn, dim3 grid) {
    return bn == 64 ? gemm_launch<T, 64>(s, a, grid) : bn == 32 ? gemm_launch<T, 32>(s, a, grid)
                                                              : gemm_launch<T, 16>(s, a, grid);
}

template <int T>
struct DenseOp {
    static cudaError_t run(cudaStream_t s, GemmArgs a, int groups, int tile) {
        if constexpr (!gemm_type<T>()) {
            return invalid("gemm: unsupported weight type " + std::to_string(T));
        } else {
            const int64_t row_tiles = ceil_div(a.rows, kBM);
            const int bn = tile ? tile : fitting_bn<T>(dense_bn(a.n_tok, row_tiles * groups));
            return gemm_launch_bn<T>(s, a, bn, dim3((unsigned)ceil_div(a.n_tok, bn), (unsigned)row_tiles, groups));
        }
    }
};
template <int T>
struct GroupedOp {
    static cudaError_t run(cudaStream_t s, GemmArgs a, int bn, int max_tiles) {
        if constexpr (!gemm_type<T>()) {
            return invalid("moe_grouped: unsupported weight type " + std::to_string(T));
        } else {
            return gemm_launch_bn<T>(s, a, bn, dim3((unsigned)ceil_div(a.rows, kBM), (unsigned)max_tiles));
        }
    }
};
template <int T>
struct ActBytes {
    static cudaError_t run(size_t* out, int64_t n, int64_t cols) {
        *out = T == TYPE_F16 ? (4 * n * cols + 4 * n + 15) / 16 * 16 : gemm_type<T>() ? act_bytes<T>((int)n, cols) : 0;
        return cudaSuccess;
    }
};
size_t act_size(int type, int64_t n, int64_t cols) {
    size_t b = 0;
    cudaError_t e;
    by_type<ActBytes>(type, e, &b, n, cols);
    return b;
}
int act_kind(int type) { return type == TYPE_Q8_0 ? 32 : 256; }

// F16 weights' activations: each row scaled into f16's range by a power of two and split into two f16 parts
// (common.cuh); scale[row] = 2^e undoes the scaling. One block per row (a decode batch has few, wide rows), each
// thread 4 values at a time.
__global__ void split_f16_kernel(__half* hi, __half* lo, float* scale, const float* x, int64_t x_stride, int n,
                                 int64_t cols) {
    __shared__ float wmax[8];
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const float* xr = x + r * x_stride;
        float amax = 0.0f;
        for (int64_t k = 4 * threadIdx.x; k < cols; k += 4 * blockDim.x) {
            const float4 v = *(const float4*)(xr + k);
            amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        }
        amax = warp_max(amax);
        if (lane == 0) wmax[warp] = amax;
        __syncthreads();
        amax = wmax[0];
        for (int i = 1; i < (int)(blockDim.x >> 5); ++i) amax = fmaxf(amax, wmax[i]);
        __syncthreads();  // wmax is read before the next row overwrites it
        const int e = f16_scale_exp(amax);
        const float inv = pow2f(-e);
        if (threadIdx.x == 0) scale[r] = pow2f(e);
        for (int64_t k = 4 * threadIdx.x; k < cols; k += 4 * blockDim.x) {
            const float4 v = *(const float4*)(xr + k);
            const float f[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) split_f16(f[i] * inv, hi[r * cols + k + i], lo[r * cols + k + i]);
        }
    }
}

}  // namespace

cudaError_t quantize_into(cudaStream_t s, uint8_t* work, const float* x, int64_t x_stride, int64_t n, int64_t cols,
                          int type) {
    if (type == TYPE_F16) {
        __half* hi = (__half*)work;
        return launch(split_f16_kernel, dim3((unsigned)std::min<int64_t>(n, 8 * props().sms)), dim3(256), 0, s, hi,
                      hi + n * cols, (float*)(hi + 2 * n * cols), x, x_stride, (int)n, cols);
    }
    const int kind = act_kind(type);
    int8_t* qs = (int8_t*)work;
    float* d = (float*)(work + n * cols);
    int16_t* bs = (int16_t*)(work + n * cols + 4 * n * (cols / kind));
    const int order = type == TYPE_IQ2_XXS ? kActPairs : type == TYPE_Q2_K || type == TYPE_Q4_K ? kActF16Sums : kActCpu;
    return quantize_act(s, qs, d, kind == 256 ? bs : nullptr, x, x_stride, (int)n, cols, kind, order);
}

namespace {

// ---- grouped MoE helpers ---------------------------------------------------------------------------------------

// Pairs by expert, in one block: pos_of[p] (p = t * n_used + j), pair_at[pos], tiles (expert, first, count) of up
// to bn consecutive positions of one expert, n_tiles. shared: 2 * n_expert ints.
__global__ void moe_sort_kernel(int32_t* pos_of, int32_t* pair_at, int32_t* tiles, int32_t* n_tiles,
                                const int32_t* ids, int n_pairs, int n_expert, int bn) {
    extern __shared__ int sh[];
    int* cnt = sh;
    int* base = sh + n_expert;
    pdl_trigger();
    pdl_wait();
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int e = ids[p] < 0 || ids[p] >= n_expert ? 0 : ids[p];
        pos_of[p] = atomicAdd(&cnt[e], 1);  // rank within the expert for now
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int off = 0, nt = 0;
        for (int e = 0; e < n_expert; ++e) {
            base[e] = off;
            for (int i = 0; i < cnt[e]; i += bn, ++nt) {
                tiles[3 * nt] = e;
                tiles[3 * nt + 1] = off + i;
                tiles[3 * nt + 2] = min(bn, cnt[e] - i);
            }
            off += cnt[e];
        }
        *n_tiles = nt;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const int e = ids[p] < 0 || ids[p] >= n_expert ? 0 : ids[p];
        const int pos = base[e] + pos_of[p];
        pos_of[p] = pos;
        pair_at[pos] = p;
    }
}

// mid[pos] = silu(min(g, clamp)) * clip(u, +-clamp) * weights[pair_at[pos]], in place over g. Blocks walk whole
// rows (no division per element).
__global__ void moe_swiglu_kernel(float* g, const float* u, const float* weights, const int32_t* pair_at,
                                  int64_t n_pairs, int64_t n_ff, float clamp) {
    pdl_trigger();
    pdl_wait();
    for (int64_t pos = blockIdx.x; pos < n_pairs; pos += gridDim.x) {
        const float w = weights[pair_at[pos]];
        float* gr = g + pos * n_ff;
        const float* ur = u + pos * n_ff;
        for (int64_t i = threadIdx.x; i < n_ff; i += blockDim.x) {
            const float gc = fminf(gr[i], clamp), uc = fminf(fmaxf(ur[i], -clamp), clamp);
            gr[i] = silu(gc) * uc * w;
        }
    }
}

// out[t] (+)= sum over j in order of d[pos_of[t * n_used + j]]. Blocks walk whole tokens.
__global__ void moe_combine_kernel(float* out, int64_t out_stride, const float* d, const int32_t* pos_of, int n_tok,
                                   int n_used, int64_t n_embd, bool accumulate) {
    pdl_trigger();
    pdl_wait();
    for (int t = blockIdx.x; t < n_tok; t += gridDim.x) {
        const int32_t* pos = pos_of + (int64_t)t * n_used;
        float* dst = out + t * out_stride;
        for (int64_t o = threadIdx.x; o < n_embd; o += blockDim.x) {
            float v = 0.0f;
            for (int j = 0; j < n_used; ++j) v += d[pos[j] * n_embd + o];
            dst[o] = accumulate ? dst[o] + v : v;
        }
    }
}

// Tile width of a grouped MoE over n_pairs pairs (tile: 16, 32 or 64 to force one; 0 chooses), narrowed to what
// this device's shared memory allows for both weight types: the sort lists tiles of this width and every grouped
// product must take them whole.
template <int T>
struct FitBn {
    static cudaError_t run(int* bn) {
        if constexpr (gemm_type<T>()) *bn = fitting_bn<T>(*bn);
        return cudaSuccess;
    }
};
int moe_bn(int64_t n_pairs, int n_expert, int tile, int gate_type, int down_type) {
    const int64_t mean = ceil_div(n_pairs, n_expert);
    int g = tile ? tile : mean <= 6 ? 16 : mean <= 32 ? 32 : 64, d = g;
    cudaError_t e;
    by_type<FitBn>(gate_type, e, &g);
    by_type<FitBn>(down_type, e, &d);
    return std::min(g, d);
}

// The grouped MoE's workspace, in order (each piece 256-byte aligned).
struct MoeWork {
    size_t pos_of, pair_at, tiles, n_tiles, hq, g, u, midq, d, bytes;
    int bn, max_tiles;
    MoeWork(int gate_type, int down_type, int n_tok, int n_used, int64_t n_embd, int64_t n_ff, int n_expert,
            int tile) {
        const int64_t P = (int64_t)n_tok * n_used;
        bn = moe_bn(P, n_expert, tile, gate_type, down_type);
        max_tiles = (int)(ceil_div(P, bn) + std::min<int64_t>(n_expert, P));
        size_t at = 0;
        auto take = [&](size_t n) {
            const size_t here = at;
            at += (n + 255) / 256 * 256;
            return here;
        };
        pos_of = take(4 * P);
        pair_at = take(4 * P);
        tiles = take(12 * (size_t)max_tiles);
        n_tiles = take(4);
        hq = take(act_size(gate_type, n_tok, n_embd));
        g = take(4 * P * n_ff);
        u = take(4 * P * n_ff);
        midq = take(act_size(down_type, P, n_ff));
        d = take(4 * P * n_embd);
        bytes = at;
    }
};

// Whether a call suits the kernels' 32-bit offsets: each matrix (an expert's) and the call's activations (at
// most two bytes per value) under 4 GiB.
bool offsets_fit(int64_t matrix_bytes, int64_t act_values) {
    return matrix_bytes < (1LL << 32) && 2 * act_values < (1LL << 32);
}

}  // namespace
}  // namespace ds4::cuda

using namespace ds4;
using namespace ds4::cuda;

bool ds4_cuda_gemm_ok(int type, int64_t cols) {
    return (type == TYPE_Q8_0 || type == TYPE_Q2_K || type == TYPE_Q4_K || type == TYPE_IQ2_XXS ||
            type == TYPE_F16) && cols > 0 && cols % 256 == 0;
}

size_t ds4_cuda_gemm_work_bytes(int type, int n_tok, int64_t rows, int64_t cols, int groups) {
    if (!ds4_cuda_gemm_ok(type, cols)) return 0;
    return std::max(act_size(type, n_tok, cols * groups), gemm_sm90_work_bytes(type, n_tok, rows, cols, groups));
}

cudaError_t ds4_cuda_gemm(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                          int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work,
                          int tile) {
    clear_error();
    if (!ds4_cuda_gemm_ok(type, cols))
        return invalid("gemm: needs a Q8_0, Q2_K, Q4_K, IQ2_XXS or F16 matrix of rows a multiple of 256 weights");
    if (rows < 1 || n_tok < 1 || groups < 1 || groups > 65535 || rows > 65535LL * kBM)
        return invalid("gemm: needs 1 <= rows <= 4194240, n_tok >= 1, 1 <= groups <= 65535");
    if ((uintptr_t)w % 16 || (uintptr_t)x % 16 || x_stride % 4 || x_stride < cols * groups || !work ||
        (uintptr_t)work % 16)
        return invalid("gemm: w, x and work must be 16-byte aligned, x rows covering groups * cols");
    if (y_stride < rows * groups) return invalid("gemm: y_stride is shorter than a row of y");
    if (!offsets_fit(rows * (int64_t)row_bytes(type, cols), (int64_t)n_tok * cols * groups))
        return invalid("gemm: a matrix or the activations of one call exceed 4 GiB");
    if (type == TYPE_IQ2_XXS && !iq2_tables()) return invalid("gemm: call ds4_cuda_init first");
    if (tile != 0 && tile != 16 && tile != 32 && tile != 64) return invalid("gemm: tile must be 0, 16, 32 or 64");
    if (tile == 0 && gemm_sm90_ok(type, y, y_stride, rows, n_tok)) {
        const cudaError_t e = gemm_sm90(s, y, y_stride, w, type, rows, cols, x, x_stride, n_tok, groups, work);
        if (e != cudaErrorNotSupported) return e;  // else a shape CUTLASS refuses: the int8 path
    }
    cudaError_t e = quantize_into(s, (uint8_t*)work, x, x_stride, n_tok, cols * groups, type);
    if (e != cudaSuccess) return e;
    const int64_t rb = (int64_t)row_bytes(type, cols);
    GemmArgs a{y, y_stride, (const uint8_t*)w, rows, cols, rb, rows * rb, (const uint8_t*)work, n_tok,
               cols * groups, n_tok, nullptr, nullptr, nullptr, 1, iq2_tables()};
    by_type<DenseOp>(type, e, s, a, groups, tile);
    return e;
}

size_t ds4_cuda_moe_work_bytes(int gate_type, int down_type, int n_tok, int n_used, int64_t n_embd, int64_t n_ff,
                               int n_expert) {
    // the most tiles of any width: the narrowest's
    return MoeWork(gate_type, down_type, n_tok, n_used, n_embd, n_ff, n_expert, 16).bytes;
}

cudaError_t ds4_cuda_moe_grouped(cudaStream_t s, float* out, int64_t out_stride, const float* h, int64_t h_stride,
                                 const void* gate, const void* up, const void* down, int gate_type, int down_type,
                                 int64_t n_ff, int64_t n_embd, int n_expert, const int32_t* ids,
                                 const float* weights, int n_used, int n_tok, float clamp, bool accumulate,
                                 void* work, int tile) {
    clear_error();
    if (!ds4_cuda_gemm_ok(gate_type, n_embd) || !ds4_cuda_gemm_ok(down_type, n_ff))
        return invalid("moe_grouped: needs Q8_0, Q2_K, Q4_K, IQ2_XXS or F16 experts of rows a multiple of 256 "
                       "weights");
    if (n_expert < 1 || n_expert > 4096 || n_used < 1 || n_tok < 1 || (int64_t)n_tok * n_used > (1 << 20) ||
        n_ff > 65535LL * kBM || n_embd > 65535LL * kBM)
        return invalid("moe_grouped: needs 1 <= n_expert <= 4096, n_used >= 1, 1 <= n_tok * n_used <= 2^20");
    if (!ids || !weights || !work || (uintptr_t)work % 16 || (uintptr_t)gate % 16 || (uintptr_t)up % 16 ||
        (uintptr_t)down % 16 || (uintptr_t)h % 16 || h_stride % 4 || h_stride < n_embd || out_stride < n_embd)
        return invalid("moe_grouped: ids, weights and work are required; weights, h and work 16-byte aligned");
    if ((gate_type == TYPE_IQ2_XXS || down_type == TYPE_IQ2_XXS) && !iq2_tables())
        return invalid("moe_grouped: call ds4_cuda_init first");
    const int64_t grb = (int64_t)row_bytes(gate_type, n_embd), drb = (int64_t)row_bytes(down_type, n_ff);
    if (!offsets_fit(std::max(n_ff * grb, n_embd * drb), (int64_t)n_tok * n_used * std::max(n_ff, n_embd)))
        return invalid("moe_grouped: an expert's matrix or the activations of one call exceed 4 GiB");
    if (tile != 0 && tile != 16 && tile != 32 && tile != 64)
        return invalid("moe_grouped: tile must be 0, 16, 32 or 64");
    const MoeWork m(gate_type, down_type, n_tok, n_used, n_embd, n_ff, n_expert, tile);
    if (m.max_tiles > 65535) return invalid("moe_grouped: too many tiles for one launch");
    uint8_t* wk = (uint8_t*)work;
    int32_t *pos_of = (int32_t*)(wk + m.pos_of), *pair_at = (int32_t*)(wk + m.pair_at);
    int32_t *tiles = (int32_t*)(wk + m.tiles), *n_tiles = (int32_t*)(wk + m.n_tiles);
    float *G = (float*)(wk + m.g), *U = (float*)(wk + m.u), *D = (float*)(wk + m.d);
    const int64_t P = (int64_t)n_tok * n_used;

    cudaError_t e = launch(moe_sort_kernel, dim3(1), dim3(1024), 2 * sizeof(int) * n_expert, s, pos_of, pair_at,
                           tiles, n_tiles, ids, (int)P, n_expert, m.bn);
    if (e == cudaSuccess) e = quantize_into(s, wk + m.hq, h, h_stride, n_tok, n_embd, gate_type);
    GemmArgs a{G, n_ff, (const uint8_t*)gate, n_ff, n_embd, grb, n_ff * grb, wk + m.hq, n_tok, n_embd, 0,
               tiles, n_tiles, pair_at, n_used, iq2_tables()};
    if (e == cudaSuccess) by_type<GroupedOp>(gate_type, e, s, a, m.bn, m.max_tiles);
    a.y = U;
    a.w = (const uint8_t*)up;
    if (e == cudaSuccess) by_type<GroupedOp>(gate_type, e, s, a, m.bn, m.max_tiles);
    if (e == cudaSuccess)
        e = launch(moe_swiglu_kernel, dim3(capped_grid(P)), dim3(256), 0, s, G, (const float*)U, weights,
                   (const int32_t*)pair_at, P, n_ff, clamp);
    if (e == cudaSuccess) e = quantize_into(s, wk + m.midq, G, n_ff, P, n_ff, down_type);
    GemmArgs b{D, n_embd, (const uint8_t*)down, n_embd, n_ff, drb, n_embd * drb, wk + m.midq, P, n_ff, 0,
               tiles, n_tiles, nullptr, 1, iq2_tables()};
    if (e == cudaSuccess) by_type<GroupedOp>(down_type, e, s, b, m.bn, m.max_tiles);
    if (e == cudaSuccess)
        e = launch(moe_combine_kernel, dim3(capped_grid(n_tok)), dim3(256), 0, s, out, out_stride,
                   (const float*)D, (const int32_t*)pos_of, n_tok, n_used, n_embd, accumulate);
    return e;
}
