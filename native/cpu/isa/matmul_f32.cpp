// The f32-activation matrix product y[t, o] = sum_i W[o, i] * x[t, i], for one ISA level, every weight type.
//
// The reduction order is the contract: each output owns kAcc vector accumulators of kLanes lanes; column i goes
// to accumulator (i / kLanes) % kAcc, lane i % kLanes, in column order, with the level's multiply-add (fused at
// AVX2/AVX-512, product then sum in portable code); a partial last step of kAcc * kLanes columns is zero-padded;
// then the accumulators are folded pairwise and summed horizontally (simd.h). Nothing in it depends on which rows
// or tokens are computed together, so one token equals a batch bit for bit, at any thread count.
//
// Decode (up to kTokens tokens) streams one weight row at a time, because a single sequential stream reads
// memory faster than several interleaved rows; the kAcc independent chains per output cover the FMA latency.
// Prefill computes tiles of kTileRows rows x kTokens tokens, so each weight vector is loaded (and converted) once
// for kTokens tokens and each activation vector once for kTileRows rows. F32/F16/BF16/Q8_0 weights are converted
// in registers; the other quantized rows are first dequantized, kChunk columns at a time, into an L1 tile (exact
// values, see dequant.cpp), which every token tile of the task then reuses.
#include <algorithm>

#include "blocks.h"
#include "kernels.h"

namespace ds4::cpu::DS4_ISA {
namespace {

#if defined(DS4_ISA_avx512)
constexpr int kAcc = 2, kTileRows = 2, kTokens = 4;  // prefill: 16 accumulators + 4 weight vectors of 32
#elif defined(DS4_ISA_avx2)
constexpr int kAcc = 4, kTileRows = 1, kTokens = 2;  // 8 accumulators + 4 weight vectors of 16 registers
#else
constexpr int kAcc = 1, kTileRows = 4, kTokens = 2;
#endif
constexpr int64_t kStep = kLanes * kAcc;  // columns per step
constexpr int64_t kChunk = 1024;          // columns per dequantized tile: at most 4 * kChunk floats = 16 KB
constexpr int64_t kTaskTokens = 32;       // tokens whose accumulators live on the stack across chunks

// Weight loaders: step(r, i, w) gives the kAcc vectors of tile row r from column i (one step); at(r, i) is where
// that step reads in memory, kStepBytes how much (0: nothing to prefetch).
struct FromF32 {
    const uint8_t* const* rows;
    static constexpr int kStepBytes = 4 * kStep;
    void step(int r, int64_t i, vf* w) const {
        for (int k = 0; k < kAcc; ++k) w[k] = vf_load((const float*)rows[r] + i + k * kLanes);
    }
    const uint8_t* at(int r, int64_t i) const { return rows[r] + 4 * i; }
};
struct FromF16 {
    const uint8_t* const* rows;
    static constexpr int kStepBytes = 2 * kStep;
    void step(int r, int64_t i, vf* w) const {
        for (int k = 0; k < kAcc; ++k) w[k] = vf_load_f16((const uint16_t*)rows[r] + i + k * kLanes);
    }
    const uint8_t* at(int r, int64_t i) const { return rows[r] + 2 * i; }
};
struct FromBF16 {
    const uint8_t* const* rows;
    static constexpr int kStepBytes = 2 * kStep;
    void step(int r, int64_t i, vf* w) const {
        for (int k = 0; k < kAcc; ++k) w[k] = vf_load_bf16((const uint16_t*)rows[r] + i + k * kLanes);
    }
    const uint8_t* at(int r, int64_t i) const { return rows[r] + 2 * i; }
};
struct FromQ8_0 {  // q * d is exact in float: the same values as dequantize gives
    const uint8_t* const* rows;
    static constexpr int kStepBytes = (int)sizeof(BlockQ8_0) * kStep / QK8_0;
    void step(int r, int64_t i, vf* w) const {  // a step never crosses a block: kStep divides 32
        const uint8_t* blk = at(r, i);
        const vf d = vf_set1(fp16_to_fp32(load_unaligned<uint16_t>(blk)));
        for (int k = 0; k < kAcc; ++k) w[k] = vf_mul(vf_from_i8(blk + 2 + i % QK8_0 + k * kLanes), d);
    }
    const uint8_t* at(int r, int64_t i) const { return rows[r] + i / QK8_0 * sizeof(BlockQ8_0); }
};
struct FromTile {  // a dequantized chunk (or the padded tail), column i relative to its start: already in L1
    const float* tile;
    int64_t row_stride;
    static constexpr int kStepBytes = 0;
    void step(int r, int64_t i, vf* w) const {
        for (int k = 0; k < kAcc; ++k) w[k] = vf_load(tile + r * row_stride + i + k * kLanes);
    }
    const uint8_t* at(int, int64_t) const { return nullptr; }
};

// Accumulators of a row tile: acc[((r * kTaskTokens) + t) * kAcc + k].
inline vf& slot(vf* acc, int r, int64_t t, int k) { return acc[(r * kTaskTokens + t) * kAcc + k]; }

// acc(r, t) += W[r, i0 + i] * x_t[i] over i in [0, n), n a multiple of kStep, for NR rows and NT tokens.
template <int NR, int NT, class Load>
inline void madd_span(vf* acc, const Load& load, int64_t i0, const float* const* xs, int64_t n) {
    vf a[NR][NT][kAcc];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t)
            for (int k = 0; k < kAcc; ++k) a[r][t][k] = slot(acc, r, t, k);
    for (int64_t i = 0; i < n; i += kStep) {
        vf w[NR][kAcc];
        for (int r = 0; r < NR; ++r) {
            prefetch_ahead(load.at(r, i0 + i), Load::kStepBytes);
            load.step(r, i0 + i, w[r]);
        }
        for (int k = 0; k < kAcc; ++k)
            for (int t = 0; t < NT; ++t) {
                const vf xv = vf_load(xs[t] + i + k * kLanes);
                for (int r = 0; r < NR; ++r) a[r][t][k] = vf_madd(w[r][k], xv, a[r][t][k]);
            }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t)
            for (int k = 0; k < kAcc; ++k) slot(acc, r, t, k) = a[r][t][k];
}

// Columns [c0, c0 + n) of one row tile for the tokens [t0, t1) of the task, in token tiles of up to kTokens.
template <int NR, class Load>
void madd_tokens(vf* acc, const Load& load, int64_t i0, const MatmulJob& job, int64_t c0, int64_t n, int64_t t0,
                 int64_t t1) {
    for (int64_t t = t0; t < t1;) {
        const int nt = (int)std::min<int64_t>(kTokens, t1 - t);
        const float* xs[kTokens];
        for (int k = 0; k < nt; ++k) xs[k] = job.x + (t + k) * job.x_stride + c0;
        vf* a = acc + (t - t0) * kAcc;
        switch (nt) {
            case 1: madd_span<NR, 1>(a, load, i0, xs, n); break;
            case 2: madd_span<NR, 2>(a, load, i0, xs, n); break;
#if defined(DS4_ISA_avx512)
            case 3: madd_span<NR, 3>(a, load, i0, xs, n); break;
            case 4: madd_span<NR, 4>(a, load, i0, xs, n); break;
#endif
        }
        t += nt;
    }
}

float load_weight(int type, const uint8_t* row, int64_t i) {
    switch (type) {
        case TYPE_F16: return fp16_to_fp32(load_unaligned<uint16_t>(row + 2 * i));
        case TYPE_BF16: return bf16_to_fp32(load_unaligned<uint16_t>(row + 2 * i));
        default: return load_unaligned<float>(row + 4 * i);
    }
}

// One tile of NR rows (a partial tile repeats its last row and drops it) for tokens [t0, t1).
template <int NR>
void row_tile(const MatmulJob& job, const uint8_t* const* rows, int nrows, int64_t r, int64_t t0, int64_t t1,
              float* tile) {
    vf acc[NR * kTaskTokens * kAcc];
    for (int k = 0; k < NR; ++k)
        for (int64_t t = 0; t < t1 - t0; ++t)
            for (int a = 0; a < kAcc; ++a) slot(acc, k, t, a) = vf_zero();

    const int bw = block_weights(job.type);
    const bool direct = bw == 1 || job.type == TYPE_Q8_0;  // converted in registers, no dequantized tile
    const int64_t full = bw == 1 ? job.cols / kStep * kStep : job.cols;  // quantized rows: cols % 32 == 0
    const int64_t chunk = direct ? std::max<int64_t>(full, 1) : kChunk;  // direct rows: one pass, one stream
    for (int64_t c0 = 0; c0 < full; c0 += chunk) {
        const int64_t n = std::min(chunk, full - c0);
        switch (job.type) {
            case TYPE_F32: madd_tokens<NR>(acc, FromF32{rows}, c0, job, c0, n, t0, t1); break;
            case TYPE_F16: madd_tokens<NR>(acc, FromF16{rows}, c0, job, c0, n, t0, t1); break;
            case TYPE_BF16: madd_tokens<NR>(acc, FromBF16{rows}, c0, job, c0, n, t0, t1); break;
            case TYPE_Q8_0: madd_tokens<NR>(acc, FromQ8_0{rows}, c0, job, c0, n, t0, t1); break;
            default:
                for (int k = 0; k < NR; ++k) {
                    prefetch_ahead(rows[k] + c0 / bw * block_bytes(job.type), (int)(n / bw * block_bytes(job.type)));
                    dequantize_blocks(tile + k * kChunk, rows[k], job.type, c0 / bw, n / bw);
                }
                madd_tokens<NR>(acc, FromTile{tile, kChunk}, 0, job, c0, n, t0, t1);
        }
    }
    if (full < job.cols) {  // the zero-padded last step of F32/F16/BF16 rows
        const int64_t rem = job.cols - full;
        alignas(64) float wt[NR][kStep] = {}, xt[kStep] = {};
        for (int k = 0; k < NR; ++k)
            for (int64_t i = 0; i < rem; ++i) wt[k][i] = load_weight(job.type, rows[k], full + i);
        const float* xs[1] = {xt};
        for (int64_t t = t0; t < t1; ++t) {
            std::copy_n(job.x + t * job.x_stride + full, rem, xt);
            madd_span<NR, 1>(acc + (t - t0) * kAcc, FromTile{&wt[0][0], kStep}, 0, xs, kStep);
        }
    }
    for (int k = 0; k < nrows; ++k)
        for (int64_t t = t0; t < t1; ++t) {
            vf* a = &slot(acc, k, t - t0, 0);
            for (int half = kAcc / 2; half >= 1; half /= 2)
                for (int i = 0; i < half; ++i) a[i] = vf_add(a[i], a[i + half]);
            job.y[t * job.y_stride + r + k] = vf_hsum(a[0]);
        }
}

template <int NR>
void rows_f32(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    alignas(64) float tile[NR * kChunk];
    for (int64_t r = r0; r < r1; r += NR) {
        const int nrows = (int)std::min<int64_t>(NR, r1 - r);
        const uint8_t* rows[NR];
        for (int k = 0; k < NR; ++k) rows[k] = job.w + (r + std::min(k, nrows - 1)) * job.row_bytes;
        for (int64_t t = t0; t < t1; t += kTaskTokens)
            row_tile<NR>(job, rows, nrows, r, t, std::min(t1, t + kTaskTokens), tile);
    }
}

}  // namespace

void matmul_f32(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    if (t1 - t0 <= kTokens)
        rows_f32<1>(job, r0, r1, t0, t1);
    else
        rows_f32<kTileRows>(job, r0, r1, t0, t1);
}

}  // namespace ds4::cpu::DS4_ISA
