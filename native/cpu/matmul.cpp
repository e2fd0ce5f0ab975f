// The ops of ds4d._cpu above the kernels: activation quantization, and cutting dequantize / matmul into tasks
// for the pool.
//
// How a product is cut: rows in multiples of 8, tokens in chunks of at most 64. With one token chunk (decode,
// small batches) the rows are split into about four tasks per thread, which the pool balances dynamically; the
// kernels take each row through all of the chunk's tokens, so every weight is read from memory once. With more
// chunks each task's rows are limited to ~256 KB of weights, so they stay in L2 while the task's tokens pass.
// Every output is computed independently of the cut, so the cut is free to depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ds4_cpu.h"
#include "kernels.h"
#include "pool.h"

using namespace ds4;
using namespace ds4::cpu;

namespace {

constexpr int64_t kRowAlign = 8;            // rows per unit of work
constexpr int64_t kMaxTaskTokens = 64;
constexpr int64_t kTaskWeightBytes = 256 << 10;
constexpr double kInlineWork = 1 << 18;     // multiply-adds below which waking the workers costs more than it saves

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Round half to even for |v| < 2^22 in the default rounding mode: adding 1.5 * 2^23 leaves no fraction bits.
inline float round_half_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// One row of x -> the planes of one quantized activation row (ds4_quant.h), padding zeroed.
struct ActPlanes {
    float* d;
    int8_t* qs;
    int16_t* sums;
    ActPlanes(uint8_t* row, const ActRowLayout& l, int block)
        : d((float*)row), qs((int8_t*)(row + l.qs_offset)), sums((int16_t*)(row + l.sums_offset)) {
        const int64_t nb8 = (int64_t)l.qs_offset / 4;
        std::fill(d + l.nb, d + nb8, 0.0f);
        std::fill(qs + l.nb * block, qs + nb8 * block, (int8_t)0);
        const int64_t per_block = block == QK8_0 ? 1 : 16;
        std::fill(sums + l.nb * per_block, sums + nb8 * per_block, (int16_t)0);
    }
};

void quantize_row_q8_0(uint8_t* row, const ActRowLayout& l, const float* x) {
    ActPlanes p(row, l, QK8_0);
    for (int64_t b = 0; b < l.nb; ++b, x += QK8_0) {
        float amax = 0.0f;
        for (int i = 0; i < QK8_0; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK8_0; ++i) {
            const float q = round_half_even(x[i] * id);
            const int qi = q > 127.0f ? 127 : q < -127.0f ? -127 : (int)q;
            p.qs[QK8_0 * b + i] = (int8_t)qi;
            sum += qi;
        }
        p.d[b] = d;
        p.sums[b] = (int16_t)sum;
    }
}

void quantize_row_q8_k(uint8_t* row, const ActRowLayout& l, const float* x) {
    ActPlanes p(row, l, QK_K);
    for (int64_t b = 0; b < l.nb; ++b, x += QK_K) {
        float amax = 0.0f, m = 0.0f;
        for (int i = 0; i < QK_K; ++i)
            if (std::fabs(x[i]) > amax) {  // strict: the first of equal magnitudes wins
                amax = std::fabs(x[i]);
                m = x[i];
            }
        int8_t* qs = p.qs + QK_K * b;
        int16_t* bsums = p.sums + 16 * b;
        if (m == 0.0f) {
            p.d[b] = 0.0f;
            std::fill(qs, qs + QK_K, (int8_t)0);
            std::fill(bsums, bsums + 16, (int16_t)0);
            continue;
        }
        const float iscale = -127.0f / m;
        for (int i = 0; i < QK_K; ++i) qs[i] = (int8_t)std::min(127, (int)round_half_even(iscale * x[i]));
        for (int j = 0; j < 16; ++j) {
            int sum = 0;
            for (int i = 0; i < 16; ++i) sum += qs[16 * j + i];
            bsums[j] = (int16_t)sum;
        }
        p.d[b] = 1.0f / iscale;
    }
}

// Quantizes n_tokens rows, spread over the pool when there is enough of them.
void quantize_rows(uint8_t* out, const float* x, int64_t x_stride, int64_t n_tokens, int64_t cols, int block) {
    const ActRowLayout l = act_row_layout(cols, block);
    const auto row = block == QK8_0 ? quantize_row_q8_0 : quantize_row_q8_k;
    const int64_t chunk = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(cols, 1));  // ~64K values a task
    pool().run(ceil_div(n_tokens, chunk), [&](int64_t task) {
        for (int64_t t = task * chunk; t < std::min(n_tokens, (task + 1) * chunk); ++t)
            row(out + t * l.bytes, l, x + t * x_stride);
    });
}

}  // namespace

void ds4_cpu_quantize_act(uint8_t* out, const float* x, int64_t x_stride, int64_t n_tokens, int64_t cols, int block) {
    quantize_rows(out, x, x_stride, n_tokens, cols, block);
}

void ds4_cpu_dequantize(float* out, const uint8_t* w, int type, int64_t rows, int64_t cols) {
    const IsaKernels& k = active_kernels();
    const size_t rb = row_bytes(type, cols);
    const int64_t per_task = std::max<int64_t>(1, (int64_t)((64 << 10) / std::max<size_t>(rb, 1)));
    pool().run(ceil_div(rows, per_task), [&](int64_t task) {
        k.dequantize(out, w, type, rb, cols, task * per_task, std::min(rows, (task + 1) * per_task));
    });
}

void ds4_cpu_matmul(float* y, int64_t y_stride, const uint8_t* w, int type, int64_t rows, int64_t cols,
                    const float* x, int64_t x_stride, int64_t n_tokens, bool act8) {
    if (rows == 0 || n_tokens == 0) return;
    const IsaKernels& k = active_kernels();
    MatmulJob job{type, w, row_bytes(type, cols), rows, cols, x, x_stride, nullptr, {}, y, y_stride};

    act8 = act8 && block_weights(type) > 1;
    std::vector<uint8_t> xq;
    if (act8) {
        const int block = type == TYPE_Q8_0 ? QK8_0 : QK_K;
        job.xq_layout = act_row_layout(cols, block);
        xq.resize(job.xq_layout.bytes * n_tokens);
        quantize_rows(xq.data(), x, x_stride, n_tokens, cols, block);
        job.xq = xq.data();
    }

    // Token chunks of at most kMaxTaskTokens, balanced; row chunks in whole tiles.
    const int64_t n_tc = ceil_div(n_tokens, kMaxTaskTokens);
    const int64_t tc = ceil_div(n_tokens, n_tc);
    const int64_t tiles = ceil_div(rows, kRowAlign);
    const int threads = pool().threads();
    int64_t tiles_per_task;
    if ((double)rows * (double)cols * (double)n_tokens < kInlineWork)
        tiles_per_task = tiles;
    else if (n_tc == 1)
        tiles_per_task = std::max<int64_t>(1, tiles / (4 * threads));
    else
        tiles_per_task = std::clamp<int64_t>(kTaskWeightBytes / (int64_t)(kRowAlign * job.row_bytes), 1,
                                             std::max<int64_t>(1, tiles * n_tc / (2 * threads)));
    const int64_t n_rc = ceil_div(tiles, tiles_per_task);
    const auto kernel = act8 ? k.matmul_act8 : k.matmul_f32;
    pool().run(n_rc * n_tc, [&](int64_t task) {
        const int64_t r0 = (task / n_tc) * tiles_per_task * kRowAlign, t0 = (task % n_tc) * tc;
        kernel(job, r0, std::min(rows, r0 + tiles_per_task * kRowAlign), t0, std::min(n_tokens, t0 + tc));
    });
}
