// Attention with sinks and the indexer's top-k above the kernels (MODEL.md §3.4 step 8, §3.8): which rows each
// token sees, cutting the work into tasks for the pool, and the top-k selection.
//
// Attention: one task per (token, group of up to 8 heads); a task lists its token's rows (the raw window's
// [lo, hi), then the compressed rows, read in place from their pages) and runs the kernel (isa/attention.cpp).
// A (token, head)'s output depends only on its q, its rows and its sink, never on the cut.
//
// Indexer: tokens that see at most top_k rows take them all. For the others, each token's query is transposed
// (heads in the vector lanes, padded to 16 with zeros) and its head weights scaled once (w * w_scale in float32);
// scoring tasks cover ranges of rows of one token, at most kScoreBudget scores at a time; then one selection
// task per token. Selection is exact and total: rows ordered by score, higher first, ties to the lower index,
// with -0 counted as +0 and NaN below every number; the top_k are written in ascending index order.
#include <algorithm>
#include <cstring>
#include <vector>

#include "ds4_cpu.h"
#include "kernels.h"
#include "pool.h"

using namespace ds4;
using namespace ds4::cpu;

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kScoreBudget = 4 << 20;    // scores held at once (16 MB): bounds prefill over long contexts
constexpr int64_t kMinScoreRows = 512;       // rows per scoring task, at least

// An orderable key of a score: larger key = preferred. NaN lowest, -0 equal to +0.
inline uint32_t score_key(float s) {
    if (s != s) return 0;
    if (s == 0.0f) s = 0.0f;
    uint32_t b;
    std::memcpy(&b, &s, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The top_k of n scores (n > top_k), ascending indices, into sel.
void select_top(const float* scores, int64_t n, int64_t top_k, int64_t* sel) {
    std::vector<uint32_t> keys((size_t)n), tmp;
    for (int64_t c = 0; c < n; ++c) keys[c] = score_key(scores[c]);
    tmp = keys;
    std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<uint32_t>());
    const uint32_t kth = tmp[(size_t)(top_k - 1)];
    int64_t above = 0;
    for (int64_t c = 0; c < n; ++c) above += keys[c] > kth;
    int64_t ties = top_k - above, m = 0;  // the lowest-index rows that tie with the k-th
    for (int64_t c = 0; c < n && m < top_k; ++c)
        if (keys[c] > kth || (keys[c] == kth && ties-- > 0)) sel[m++] = c;
}

}  // namespace

void ds4_cpu_attention(float* out, const float* q, int64_t n_tokens, int64_t n_heads, int64_t dim, const void* raw,
                       const int64_t* raw_lo, const int64_t* raw_hi, const void* const* comp_pages,
                       int64_t page_rows, const int64_t* comp_sel, int64_t sel_width, const int64_t* comp_n, bool f16,
                       const float* sinks, float scale) {
    const IsaKernels& k = active_kernels();
    const int64_t groups = ceil_div(n_heads, kMaxAttentionHeads);
    const int64_t row_bytes = dim * (f16 ? 2 : 4);
    pool().run(n_tokens * groups, [&](int64_t task) {
        const int64_t t = task / groups, h0 = (task % groups) * kMaxAttentionHeads;
        std::vector<const void*> rows;
        rows.reserve((size_t)(raw_hi[t] - raw_lo[t] + (comp_sel ? sel_width : comp_n[t])));
        for (int64_t r = raw_lo[t]; r < raw_hi[t]; ++r) rows.push_back((const char*)raw + r * row_bytes);
        auto comp_row = [&](int64_t c) {
            return (const void*)((const char*)comp_pages[c / page_rows] + (c % page_rows) * row_bytes);
        };
        if (comp_sel) {
            for (int64_t j = 0; j < sel_width; ++j)
                if (comp_sel[t * sel_width + j] >= 0) rows.push_back(comp_row(comp_sel[t * sel_width + j]));
        } else {
            for (int64_t c = 0; c < comp_n[t]; ++c) rows.push_back(comp_row(c));
        }
        const int nh = (int)std::min<int64_t>(kMaxAttentionHeads, n_heads - h0);
        std::vector<float> scratch((size_t)nh * rows.size());
        AttentionJob job{q + (t * n_heads + h0) * dim, sinks + h0, nh, dim, rows.data(), (int64_t)rows.size(), f16,
                         scale, out + (t * n_heads + h0) * dim, dim, scratch.data()};
        k.attention(job);
    });
}

void ds4_cpu_indexer_topk(int64_t* sel, const float* q, const float* w, int64_t n_tokens, int64_t n_heads,
                          int64_t dim, const void* const* pages, int64_t page_rows, bool f16, const int64_t* n_visible,
                          int64_t top_k, float w_scale) {
    if (top_k == 0) return;
    const IsaKernels& k = active_kernels();
    const int threads = pool().threads();
    const int64_t hp = ceil_div(n_heads, kIndexerHeadPad) * kIndexerHeadPad;
    std::vector<int64_t> scored;  // tokens that need scores
    for (int64_t t = 0; t < n_tokens; ++t) {
        int64_t* s = sel + t * top_k;
        const int64_t n = n_visible[t];
        if (n <= top_k) {
            for (int64_t c = 0; c < top_k; ++c) s[c] = c < n ? c : -1;
        } else {
            scored.push_back(t);
        }
    }
    for (size_t b0 = 0; b0 < scored.size();) {
        // a batch of tokens whose scores fit the budget (at least one token)
        size_t b1 = b0;
        int64_t total = 0;
        std::vector<int64_t> offset;
        while (b1 < scored.size() && (b1 == b0 || total + n_visible[scored[b1]] <= kScoreBudget)) {
            offset.push_back(total);
            total += n_visible[scored[b1++]];
        }
        const int64_t nb = (int64_t)(b1 - b0);
        std::vector<float> qt((size_t)(nb * dim * hp), 0.0f), wp((size_t)(nb * hp), 0.0f), scores((size_t)total);
        for (int64_t i = 0; i < nb; ++i) {
            const int64_t t = scored[b0 + i];
            for (int64_t h = 0; h < n_heads; ++h) {
                wp[i * hp + h] = w[t * n_heads + h] * w_scale;
                for (int64_t d = 0; d < dim; ++d) qt[(i * dim + d) * hp + h] = q[(t * n_heads + h) * dim + d];
            }
        }
        struct Range {
            int64_t i, c0, c1;
        };
        std::vector<Range> ranges;
        const int64_t per = std::max<int64_t>(kMinScoreRows, ceil_div(total, 4 * (int64_t)threads));
        for (int64_t i = 0; i < nb; ++i)
            for (int64_t c = 0, n = n_visible[scored[b0 + i]]; c < n; c += per)
                ranges.push_back({i, c, std::min(n, c + per)});
        pool().run((int64_t)ranges.size(), [&](int64_t r) {
            const Range& rg = ranges[(size_t)r];
            const IndexerJob job{qt.data() + rg.i * dim * hp, wp.data() + rg.i * hp, hp, dim, pages, page_rows, f16};
            k.indexer_scores(job, rg.c0, rg.c1, scores.data() + offset[rg.i] + rg.c0);
        });
        pool().run(nb, [&](int64_t i) {
            const int64_t t = scored[b0 + i];
            select_top(scores.data() + offset[i], n_visible[t], top_k, sel + t * top_k);
        });
        b0 = b1;
    }
}
