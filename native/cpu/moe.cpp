// The routed experts of one MoE layer in one call (MODEL.md §3.4 FFN step 5): grouping the tokens by expert,
// the gate/up products with the SwiGLU between, the down products, and the sum over each token's experts.
//
// Numerics: for every pair (t, k), with e = ids[t, k], the products are exactly those of ds4_cpu_matmul on the
// single expert (the f32 path, or with act8 the integer path: h quantized once per token for gate and up, mid
// quantized once per pair for down), so a pair's values depend on nothing else in the call. Between them, in
// float32 with each operation rounded and no fused multiply-add (isa/swiglu.cpp, at every level the same bits):
//   g' = min(g, clamp); u' = min(clamp, max(-clamp, u)); s = g' / (1 + exp(0 - g')); mid = (s * u') * weights[t, k]
// with exp the fixed-operation vf_exp of simd.h. The output is out[t] = ((y_t0 + y_t1) + ...) + y_t(K-1), the
// pairs' down products summed in k order. Batch invariance and thread invariance follow: the cut into tasks
// changes only who computes a value, never how.
//
// Work: the pairs are sorted by expert (counting sort, stable in (t, k) order), every used expert's weights are
// read once per call as a small matrix product over its tokens. Phase A (one pool run): tasks of (expert, rows
// of n_ff, up to 64 tokens) compute gate and up rows into task-local buffers and write mid. Then mid is quantized
// (act8), phase B computes the down products per (expert, rows of n_embd, tokens) into y (pairs, n_embd), and
// phase C sums each token's pairs. Rows per task follow ds4_cpu_matmul's rules: with one chunk of tokens an
// expert's rows are cut so that all tasks together give about four per thread (weights stream once); with several
// chunks each task's rows stay within ~256 KB so they remain in L2 while its tokens pass.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "ds4_cpu.h"
#include "kernels.h"
#include "pool.h"

using namespace ds4;
using namespace ds4::cpu;

namespace {

constexpr int64_t kRowAlign = 8;
constexpr int64_t kMaxTaskTokens = 64;
constexpr int64_t kTaskWeightBytes = 256 << 10;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One expert tensor: n_expert matrices of rows x cols, and how its product takes activations.
struct Operand {
    int type;
    const uint8_t* w;
    size_t row_bytes, expert_bytes;
    int64_t rows, cols;
    bool act8;
    int block;             // activation block (act8)
    ActRowLayout layout;   // quantized activation rows (act8)

    Operand(int type_, const uint8_t* w_, int64_t rows_, int64_t cols_, bool act8_)
        : type(type_), w(w_), row_bytes(ds4::row_bytes(type_, cols_)), rows(rows_), cols(cols_),
          act8(act8_ && block_weights(type_) > 1), block(type_ == TYPE_Q8_0 ? QK8_0 : QK_K), layout() {
        expert_bytes = row_bytes * (size_t)rows;
        if (act8) layout = act_row_layout(cols, block);
    }

    // The product job of expert e's rows [r0, r1) on n activation rows starting at x (f32) / xq (quantized).
    MatmulJob job(int64_t e, int64_t r0, int64_t r1, const float* x, const uint8_t* xq, float* y,
                  int64_t y_stride) const {
        MatmulJob j{type, w + e * expert_bytes + r0 * row_bytes, row_bytes, r1 - r0, cols, x, cols, xq, layout,
                    y, y_stride};
        return j;
    }
};

struct Task {
    int64_t e, first;      // expert, index of its first pair in expert order
    int64_t r0, r1, t0, t1;
};

struct Group {
    int64_t e, first, n;   // pairs [first, first + n) of the expert order use expert e
};

// Cut each group's rows x tokens into tasks (see the header). bytes_per_row: weight bytes one row task reads.
std::vector<Task> plan(const std::vector<Group>& groups, int64_t rows, size_t bytes_per_row, int threads) {
    const int64_t tiles = ceil_div(rows, kRowAlign);
    int64_t single_chunk_tiles = 0;
    for (const Group& g : groups)
        if (g.n <= kMaxTaskTokens) single_chunk_tiles += tiles;
    const int64_t target = std::max<int64_t>(1, single_chunk_tiles / (4 * (int64_t)threads));
    std::vector<Task> tasks;
    for (const Group& g : groups) {
        const int64_t n_tc = ceil_div(g.n, kMaxTaskTokens), tc = ceil_div(g.n, n_tc);
        int64_t per;
        if (n_tc == 1) {
            per = ceil_div(tiles, ceil_div(tiles, std::min(tiles, target)));  // even pieces of about `target`
        } else {
            per = std::clamp<int64_t>(kTaskWeightBytes / (int64_t)(kRowAlign * bytes_per_row), 1, tiles);
        }
        for (int64_t r = 0; r < tiles; r += per)
            for (int64_t t = 0; t < g.n; t += tc)
                tasks.push_back({g.e, g.first, r * kRowAlign, std::min(rows, (r + per) * kRowAlign), t,
                                 std::min(g.n, t + tc)});
    }
    return tasks;
}

// Activation rows of the pairs in expert order, for one operand: gathered f32 rows of h, or h quantized once per
// token and the quantized rows gathered.
struct PairActivations {
    std::vector<float> f32;
    std::vector<uint8_t> q;
};

void gather(PairActivations& a, const Operand& op, const float* h, int64_t h_stride, int64_t n_tokens,
            const std::vector<int64_t>& pair_token) {
    const int64_t P = (int64_t)pair_token.size(), E = op.cols;
    if (op.act8) {
        if (!a.q.empty()) return;
        std::vector<uint8_t> per_token(op.layout.bytes * n_tokens);
        ds4_cpu_quantize_act(per_token.data(), h, h_stride, n_tokens, E, op.block);
        a.q.resize(op.layout.bytes * P);
        for (int64_t i = 0; i < P; ++i)
            std::memcpy(a.q.data() + i * op.layout.bytes, per_token.data() + pair_token[i] * op.layout.bytes,
                        op.layout.bytes);
    } else {
        if (!a.f32.empty()) return;
        a.f32.resize((size_t)(P * E));
        for (int64_t i = 0; i < P; ++i) std::copy_n(h + pair_token[i] * h_stride, E, a.f32.data() + i * E);
    }
}

}  // namespace

void ds4_cpu_moe(float* out, int64_t out_stride, const float* h, int64_t h_stride, int64_t n_tokens, int64_t n_embd,
                 const int64_t* ids, const float* weights, int64_t k_used, const uint8_t* gate, int gate_type,
                 const uint8_t* up, int up_type, const uint8_t* down, int down_type, int64_t n_expert, int64_t n_ff,
                 float clamp, bool act8) {
    if (n_tokens == 0) return;
    if (k_used == 0) {
        for (int64_t t = 0; t < n_tokens; ++t) std::fill_n(out + t * out_stride, n_embd, 0.0f);
        return;
    }
    const IsaKernels& k = active_kernels();
    const int threads = pool().threads();
    const Operand og(gate_type, gate, n_ff, n_embd, act8), ou(up_type, up, n_ff, n_embd, act8),
        od(down_type, down, n_embd, n_ff, act8);

    // Pairs p = t * k_used + j, sorted by expert (stable): order[i] is the i-th pair, pos[p] where it went.
    const int64_t P = n_tokens * k_used;
    std::vector<int64_t> first(n_expert + 1, 0), order(P), pos(P), pair_token(P);
    for (int64_t p = 0; p < P; ++p) ++first[ids[p] + 1];
    for (int64_t e = 0; e < n_expert; ++e) first[e + 1] += first[e];
    std::vector<Group> groups;
    for (int64_t e = 0; e < n_expert; ++e)
        if (first[e + 1] > first[e]) groups.push_back({e, first[e], first[e + 1] - first[e]});
    {
        std::vector<int64_t> fill(first.begin(), first.end() - 1);
        for (int64_t p = 0; p < P; ++p) {
            const int64_t i = fill[ids[p]]++;
            order[i] = p;
            pos[p] = i;
            pair_token[i] = p / k_used;
        }
    }

    // ---- phase A: gate and up, SwiGLU -> mid (P, n_ff) -----------------------------------------------------------
    PairActivations xg, xu;
    gather(xg, og, h, h_stride, n_tokens, pair_token);
    const bool share = og.act8 == ou.act8 && (!og.act8 || og.block == ou.block);
    if (!share) gather(xu, ou, h, h_stride, n_tokens, pair_token);
    const PairActivations& xup = share ? xg : xu;
    const std::unique_ptr<float[]> mid_buf(new float[(size_t)(P * n_ff)]);  // every value is written below
    float* const mid = mid_buf.get();
    {
        const std::vector<Task> tasks = plan(groups, n_ff, og.row_bytes + ou.row_bytes, threads);
        pool().run((int64_t)tasks.size(), [&](int64_t i) {
            const Task& tk = tasks[(size_t)i];
            const int64_t nr = tk.r1 - tk.r0, nt = tk.t1 - tk.t0, p0 = tk.first + tk.t0;
            std::vector<float> gu((size_t)(2 * nr * nt));
            float* g = gu.data();
            float* u = g + nr * nt;
            auto run = [&](const Operand& op, const PairActivations& a, float* y) {
                const MatmulJob job =
                    op.job(tk.e, tk.r0, tk.r1, op.act8 ? nullptr : a.f32.data() + p0 * op.cols,
                           op.act8 ? a.q.data() + p0 * op.layout.bytes : nullptr, y, nr);
                (op.act8 ? k.matmul_act8 : k.matmul_f32)(job, 0, nr, 0, nt);
            };
            run(og, xg, g);
            run(ou, xup, u);
            for (int64_t t = 0; t < nt; ++t) {
                const int64_t p = order[p0 + t];
                k.swiglu(mid + (p0 + t) * n_ff + tk.r0, g + t * nr, u + t * nr, nr, clamp, weights[p]);
            }
        });
    }

    // ---- phase B: down -> y (P, n_embd) -------------------------------------------------------------------------
    std::vector<uint8_t> midq;
    if (od.act8) {
        midq.resize(od.layout.bytes * P);
        ds4_cpu_quantize_act(midq.data(), mid, n_ff, P, n_ff, od.block);
    }
    const std::unique_ptr<float[]> y_buf(new float[(size_t)(P * n_embd)]);
    float* const y = y_buf.get();
    {
        const std::vector<Task> tasks = plan(groups, n_embd, od.row_bytes, threads);
        pool().run((int64_t)tasks.size(), [&](int64_t i) {
            const Task& tk = tasks[(size_t)i];
            const int64_t p0 = tk.first + tk.t0;
            const MatmulJob job = od.job(tk.e, tk.r0, tk.r1, od.act8 ? nullptr : mid + p0 * n_ff,
                                         od.act8 ? midq.data() + p0 * od.layout.bytes : nullptr,
                                         y + p0 * n_embd + tk.r0, n_embd);
            (od.act8 ? k.matmul_act8 : k.matmul_f32)(job, 0, tk.r1 - tk.r0, 0, tk.t1 - tk.t0);
        });
    }

    // ---- phase C: out[t] = sum over j in order of y[pair (t, j)] --------------------------------------------------
    const int64_t per_task = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, n_embd * k_used));
    pool().run(ceil_div(n_tokens, per_task), [&](int64_t task) {
        for (int64_t t = task * per_task; t < std::min(n_tokens, (task + 1) * per_task); ++t) {
            float* o = out + t * out_stride;
            std::copy_n(y + pos[t * k_used] * n_embd, n_embd, o);
            for (int64_t j = 1; j < k_used; ++j) {
                const float* yj = y + pos[t * k_used + j] * n_embd;
                for (int64_t c = 0; c < n_embd; ++c) o[c] = o[c] + yj[c];
            }
        }
    });
}
