// Attention with a sink over K=V rows, and the indexer's scores, for one ISA level (MODEL.md §3.4 step 8, §3.8).
// The module (native/cpu/attention.cpp) picks the rows and cuts the work; these kernels only compute.
//
// Attention, per head of a group that shares the rows (DS4 has one K=V head, so all heads of a token share them):
//   s_r = dot(q, k_r) * scale      the dot in matmul_f32's order: kAcc vector accumulators, column i in
//                                  accumulator (i / kLanes) % kAcc, zero-padded last step, pairwise fold, vf_hsum
//   M = max(sink, max_r s_r)       (exact in any order)
//   p_r = vf_exp(s_r - M)          elementwise (simd.h)
//   den = hsum(lane sums of p in row order, row r in lane r % kLanes) + vf_exp(sink - M)
//   out_i = (sum_r p_r k_ri in row order, one multiply-add each) / den
// Rows are read in place (f16 converted on load, F16C at the SIMD levels). Pass 1 takes each row once for all
// heads of the block (the dot products); pass 2 takes, per chunk of kStep columns, every row once for all heads,
// so each row is read from memory once per pass and the accumulators stay in registers.
//
// Indexer, per key row c: score_c = sum over heads h of w_h * max(0, dot(q_h, k_c)), where each dot is one
// multiply-add chain over the dims in order (heads live in the vector lanes: the token's q is transposed by the
// module, so a dim of a key row is broadcast against kLanes heads at once), and the weighted sum over heads
// accumulates head h into lane h % kLanes, in head order, before vf_hsum. Two rows go through the query at once
// where registers allow, to hide the multiply-add latency.
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace ds4::cpu::DS4_ISA {
namespace {

#if defined(DS4_ISA_avx512)
constexpr int kAcc = 2, kHeadBlock = 8, kIdxGroup = 4, kIdxRows = 2;  // 16 accumulators + loads of 32 registers
#elif defined(DS4_ISA_avx2)
constexpr int kAcc = 2, kHeadBlock = 4, kIdxGroup = 4, kIdxRows = 2;  // 8 accumulators of 16 registers
#else
constexpr int kAcc = 1, kHeadBlock = 4, kIdxGroup = 2, kIdxRows = 2;
#endif
constexpr int64_t kStep = kLanes * kAcc;
static_assert(kMaxAttentionHeads % kHeadBlock == 0, "head blocks tile a group");
static_assert(kIndexerHeadPad % kLanes == 0, "padded heads fill whole vectors");

template <bool F16>
inline vf load_row(const void* row, int64_t i) {
    if constexpr (F16)
        return vf_load_f16((const uint16_t*)row + i);
    else
        return vf_load((const float*)row + i);
}

template <bool F16>
inline float load_one(const void* row, int64_t i) {
    if constexpr (F16)
        return fp16_to_fp32(((const uint16_t*)row)[i]);
    else
        return ((const float*)row)[i];
}

// Columns [c, c + n) of a row (n <= kStep) as kStep floats, zero-padded.
template <bool F16>
inline void padded_span(const void* row, int64_t c, int64_t n, float* out) {
    for (int64_t i = 0; i < kStep; ++i) out[i] = i < n ? load_one<F16>(row, c + i) : 0.0f;
}

inline void prefetch_row(const void* row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char*)row + o, 0, 3);
}

// ---- attention -------------------------------------------------------------------------------------------------

// acc[j] += q_j[i] * k[i] over the full steps of one row (the accumulators stay in registers: copied in and out,
// as in matmul_f32's madd_span).
template <int NH, bool F16>
inline void dot_steps(vf (&acc)[NH][kAcc], const float* const* q, const void* row, int64_t full) {
    vf a[NH][kAcc];
    for (int j = 0; j < NH; ++j)
        for (int k = 0; k < kAcc; ++k) a[j][k] = acc[j][k];
    for (int64_t i = 0; i < full; i += kStep) {
        vf kv[kAcc];
        for (int k = 0; k < kAcc; ++k) kv[k] = load_row<F16>(row, i + k * kLanes);
        for (int j = 0; j < NH; ++j)
            for (int k = 0; k < kAcc; ++k) a[j][k] = vf_madd(vf_load(q[j] + i + k * kLanes), kv[k], a[j][k]);
    }
    for (int j = 0; j < NH; ++j)
        for (int k = 0; k < kAcc; ++k) acc[j][k] = a[j][k];
}

// Pass 1 for heads [h0, h0 + NH): s[j * n + r] = dot(q_j, k_r) * scale.
template <int NH, bool F16>
void scores(const AttentionJob& job, int h0, float* s) {
    const int64_t D = job.dim, n = job.n_rows, full = D / kStep * kStep;
    const float* q[NH];
    alignas(64) float qtail[NH][kStep], ktail[kStep];
    for (int j = 0; j < NH; ++j) {
        q[j] = job.q + (h0 + j) * D;
        padded_span<false>(q[j], full, D - full, qtail[j]);
    }
    const int64_t row_bytes = D * (F16 ? 2 : 4);
    for (int64_t r = 0; r < n; ++r) {
        const void* row = job.rows[r];
        if (r + 2 < n) prefetch_row(job.rows[r + 2], row_bytes);
        vf acc[NH][kAcc];
        for (int j = 0; j < NH; ++j)
            for (int a = 0; a < kAcc; ++a) acc[j][a] = vf_zero();
        dot_steps<NH, F16>(acc, q, row, full);
        if (full < D) {
            padded_span<F16>(row, full, D - full, ktail);
            const float* qt[NH];
            for (int j = 0; j < NH; ++j) qt[j] = qtail[j];
            dot_steps<NH, false>(acc, qt, ktail, kStep);
        }
        for (int j = 0; j < NH; ++j) {
            for (int half = kAcc / 2; half >= 1; half /= 2)
                for (int a = 0; a < half; ++a) acc[j][a] = vf_add(acc[j][a], acc[j][a + half]);
            s[j * n + r] = vf_hsum(acc[j][0]) * job.scale;
        }
    }
}

// Scores -> weights in place; returns the denominator.
float softmax_with_sink(float* s, int64_t n, float sink) {
    float m = sink;
    for (int64_t r = 0; r < n; ++r) m = s[r] > m ? s[r] : m;
    const vf mv = vf_set1(m);
    vf sum = vf_zero();
    int64_t r = 0;
    for (; r + kLanes <= n; r += kLanes) {
        const vf p = vf_exp(vf_sub(vf_load(s + r), mv));
        vf_store(s + r, p);
        sum = vf_add(sum, p);
    }
    if (r < n) {
        alignas(64) float t[kLanes];
        std::fill(t, t + kLanes, m);  // padding lanes: exp(0) = 1, dropped below
        std::copy(s + r, s + n, t);
        vf_store(t, vf_exp(vf_sub(vf_load(t), mv)));
        std::fill(t + (n - r), t + kLanes, 0.0f);
        std::copy(t, t + (n - r), s + r);
        sum = vf_add(sum, vf_load(t));
    }
    alignas(64) float e[kLanes];
    vf_store(e, vf_exp(vf_sub(vf_set1(sink), mv)));
    return vf_hsum(sum) + e[0];
}

// Columns [c, c + kStep) of out_j = sum_r p[j * n + r] k_r for NH heads, into acc (registers). Tail: the rows'
// last columns through a zero-padded copy.
template <int NH, bool F16, bool Tail>
inline void weighted_chunk(vf (&acc)[NH][kAcc], const AttentionJob& job, const float* p, int64_t c, int64_t width) {
    const int64_t n = job.n_rows;
    alignas(64) float ktail[kStep];
    vf a[NH][kAcc];
    for (int j = 0; j < NH; ++j)
        for (int k = 0; k < kAcc; ++k) a[j][k] = vf_zero();
    for (int64_t r = 0; r < n; ++r) {
        vf kv[kAcc];
        if constexpr (Tail) {
            padded_span<F16>(job.rows[r], c, width, ktail);
            for (int k = 0; k < kAcc; ++k) kv[k] = vf_load(ktail + k * kLanes);
        } else {
            for (int k = 0; k < kAcc; ++k) kv[k] = load_row<F16>(job.rows[r], c + k * kLanes);
        }
        for (int j = 0; j < NH; ++j) {
            const vf pv = vf_set1(p[j * n + r]);
            for (int k = 0; k < kAcc; ++k) a[j][k] = vf_madd(pv, kv[k], a[j][k]);
        }
    }
    for (int j = 0; j < NH; ++j)
        for (int k = 0; k < kAcc; ++k) acc[j][k] = a[j][k];
}

// Pass 2 for heads [h0, h0 + NH): out_j = sum_r p[j * n + r] k_r / den_j, kStep columns at a time.
template <int NH, bool F16>
void weighted_sum(const AttentionJob& job, int h0, const float* p, const float* den) {
    const int64_t D = job.dim;
    alignas(64) float otail[kStep];
    for (int64_t c = 0; c < D; c += kStep) {
        const int64_t width = std::min<int64_t>(kStep, D - c);
        vf acc[NH][kAcc];
        if (width == kStep)
            weighted_chunk<NH, F16, false>(acc, job, p, c, width);
        else
            weighted_chunk<NH, F16, true>(acc, job, p, c, width);
        for (int j = 0; j < NH; ++j) {
            float* o = job.out + (h0 + j) * job.out_stride + c;
            const vf dv = vf_set1(den[j]);
            for (int a = 0; a < kAcc; ++a) {
                const vf v = vf_div(acc[j][a], dv);
                if (width == kStep)
                    vf_store(o + a * kLanes, v);
                else
                    vf_store(otail + a * kLanes, v);
            }
            if (width < kStep) std::copy(otail, otail + width, o);
        }
    }
}

template <int NH, bool F16>
void head_block(const AttentionJob& job, int h0) {
    float* s = job.scratch + h0 * job.n_rows;
    scores<NH, F16>(job, h0, s);
    float den[NH];
    for (int j = 0; j < NH; ++j) den[j] = softmax_with_sink(s + j * job.n_rows, job.n_rows, job.sinks[h0 + j]);
    weighted_sum<NH, F16>(job, h0, s, den);
}

template <bool F16, int NH = kHeadBlock>
void head_block_n(const AttentionJob& job, int h0, int nh) {
    if constexpr (NH > 1)
        if (nh < NH) return head_block_n<F16, NH - 1>(job, h0, nh);
    head_block<NH, F16>(job, h0);
}

// ---- indexer ---------------------------------------------------------------------------------------------------

// Head vectors [v0, v0 + NV) for R rows (float32 rows kr[k]): sum[k] += w * max(0, dot).
template <int NV, int R>
inline void indexer_heads(const IndexerJob& job, int64_t v0, const float* const* kr, vf* sum) {
    vf acc[R][NV];
    for (int k = 0; k < R; ++k)
        for (int v = 0; v < NV; ++v) acc[k][v] = vf_zero();
    const float* qt = job.qt + v0 * kLanes;
    for (int64_t i = 0; i < job.dim; ++i, qt += job.heads) {
        vf kb[R];
        for (int k = 0; k < R; ++k) kb[k] = vf_set1(kr[k][i]);
        for (int v = 0; v < NV; ++v) {
            const vf qv = vf_load(qt + v * kLanes);
            for (int k = 0; k < R; ++k) acc[k][v] = vf_madd(qv, kb[k], acc[k][v]);
        }
    }
    for (int k = 0; k < R; ++k)
        for (int v = 0; v < NV; ++v)
            sum[k] = vf_madd(vf_max(acc[k][v], vf_zero()), vf_load(job.w + (v0 + v) * kLanes), sum[k]);
}

template <int R>
void indexer_rows(const IndexerJob& job, const float* const* kr, float* scores) {
    vf sum[R];
    for (int k = 0; k < R; ++k) sum[k] = vf_zero();
    const int64_t nv = job.heads / kLanes;
    int64_t v = 0;
    for (; v + kIdxGroup <= nv; v += kIdxGroup) indexer_heads<kIdxGroup, R>(job, v, kr, sum);
    for (; v < nv; ++v) indexer_heads<1, R>(job, v, kr, sum);
    for (int k = 0; k < R; ++k) scores[k] = vf_hsum(sum[k]);
}

template <bool F16>
void indexer_range(const IndexerJob& job, int64_t c0, int64_t c1, float* scores) {
    const int64_t D = job.dim;
    std::vector<float> conv(F16 ? kIdxRows * D : 0);
    const int64_t row_bytes = D * (F16 ? 2 : 4);
    auto row_at = [&](int64_t c) {
        return (const char*)job.pages[c / job.page_rows] + (c % job.page_rows) * row_bytes;
    };
    for (int64_t c = c0; c < c1; c += kIdxRows) {
        const int nr = (int)std::min<int64_t>(kIdxRows, c1 - c);
        const float* kr[kIdxRows];
        for (int k = 0; k < nr; ++k) {
            const void* row = row_at(c + k);
            if (c + k + 2 * kIdxRows < c1) prefetch_row(row_at(c + k + 2 * kIdxRows), row_bytes);
            if constexpr (F16) {
                float* dst = conv.data() + k * D;
                int64_t i = 0;
                for (; i + kLanes <= D; i += kLanes) vf_store(dst + i, vf_load_f16((const uint16_t*)row + i));
                for (; i < D; ++i) dst[i] = fp16_to_fp32(((const uint16_t*)row)[i]);
                kr[k] = dst;
            } else {
                kr[k] = (const float*)row;
            }
        }
        if (nr == kIdxRows)
            indexer_rows<kIdxRows>(job, kr, scores + (c - c0));
        else
            for (int k = 0; k < nr; ++k) indexer_rows<1>(job, kr + k, scores + (c - c0) + k);
    }
}

}  // namespace

void attention(const AttentionJob& job) {
    for (int h0 = 0; h0 < job.n_heads; h0 += kHeadBlock) {
        const int nh = std::min(kHeadBlock, job.n_heads - h0);
        if (job.f16)
            head_block_n<true>(job, h0, nh);
        else
            head_block_n<false>(job, h0, nh);
    }
}

void indexer_scores(const IndexerJob& job, int64_t c0, int64_t c1, float* scores) {
    if (job.f16)
        indexer_range<true>(job, c0, c1, scores);
    else
        indexer_range<false>(job, c0, c1, scores);
}

}  // namespace ds4::cpu::DS4_ISA
