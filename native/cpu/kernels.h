// The seam between the module (dispatch, pool, bindings) and the kernels compiled once per ISA level.
//
// Every native/cpu/isa/*.cpp is built three times (portable, AVX2+FMA+F16C, AVX-512 with VNNI) with DS4_ISA set
// to the level's name, and puts its code in namespace ds4::cpu::<level>. Each level exports one IsaKernels table;
// the module picks a table at run time from what the CPU supports. Kernels only compute: arguments were checked
// by the caller, and the caller cut the work into ranges of rows and tokens for the thread pool.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ds4_quant.h"

namespace ds4::cpu {

// One matrix product y[t, o] = sum_i W[o, i] * x[t, i], described once and computed range by range.
struct MatmulJob {
    int type;                 // GGML type code of W
    const uint8_t* w;         // rows consecutive rows of row_bytes bytes each
    size_t row_bytes;
    int64_t rows, cols;
    const float* x;           // f32 activations: row t at x + t * x_stride (f32 path)
    int64_t x_stride;
    const uint8_t* xq;        // quantized activations (act8 path): row t at xq + t * xq_layout.bytes, Q8_0
    ActRowLayout xq_layout;   //   activations for Q8_0 weights, Q8_K for the 256-blocks (ds4_quant.h)
    float* y;                 // row t at y + t * y_stride
    int64_t y_stride;
};

// Attention with a sink for one token and a group of heads that share their K=V rows (MODEL.md §3.4 step 8).
struct AttentionJob {
    const float* q;             // head j of the group at q + j * dim
    const float* sinks;         // one logit per head of the group
    int n_heads;                // at most kMaxAttentionHeads
    int64_t dim;
    const void* const* rows;    // n_rows pointers to rows of dim values, in softmax order
    int64_t n_rows;
    bool f16;                   // rows hold IEEE halves (else float32)
    float scale;
    float* out;                 // head j at out + j * out_stride
    int64_t out_stride;
    float* scratch;             // n_heads * n_rows floats
};
constexpr int kMaxAttentionHeads = 8;

// The indexer's scores of one token (MODEL.md §3.8) over key rows kept in pages.
struct IndexerJob {
    const float* qt;            // (dim, heads) the token's heads transposed: qt[i * heads + h]; heads padded with 0
    const float* w;             // (heads) head weights, w_scale applied; padded with 0
    int64_t heads;              // a multiple of kIndexerHeadPad
    int64_t dim;
    const void* const* pages;   // page p holds rows [p * page_rows, (p + 1) * page_rows), dim values each
    int64_t page_rows;
    bool f16;
};
constexpr int kIndexerHeadPad = 16;

struct IsaKernels {
    const char* name;
    // W rows [r0, r1) -> f32 rows [r0, r1) of out (rows, cols), bit for bit what gguf.quants.dequantize gives.
    void (*dequantize)(float* out, const uint8_t* w, int type, size_t row_bytes, int64_t cols, int64_t r0,
                       int64_t r1);
    // y rows [r0, r1) of tokens [t0, t1): f32 activations, an f32 dot per output in a fixed per-level order.
    void (*matmul_f32)(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
    // The same range from quantized activations, exactly as ds4_quant.h and matmul_act8.cpp define it.
    void (*matmul_act8)(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
    // The experts' SwiGLU, elementwise over n values: mid = (silu(min(g, c)) * clip(u, -c, c)) * weight, in the
    // fixed float32 operations spelled out in moe.cpp (the same bits at every level). mid may alias g.
    void (*swiglu)(float* mid, const float* g, const float* u, int64_t n, float clamp, float weight);
    // One AttentionJob: out = sum_r e^(s_r - M) k_r / (e^(sink - M) + sum_r e^(s_r - M)) per head.
    void (*attention)(const AttentionJob& job);
    // scores[c - c0] for key rows c in [c0, c1): sum over heads of w_h * max(0, q_h . k_c).
    void (*indexer_scores)(const IndexerJob& job, int64_t c0, int64_t c1, float* scores);
};

namespace portable { extern const IsaKernels kernels; }
#ifdef DS4_HAVE_AVX2
namespace avx2 { extern const IsaKernels kernels; }
#endif
#ifdef DS4_HAVE_AVX512
namespace avx512 { extern const IsaKernels kernels; }
#endif

// Inside an ISA translation unit: the entry points that its kernels table points at.
#ifdef DS4_ISA
namespace DS4_ISA {
void dequantize(float* out, const uint8_t* w, int type, size_t row_bytes, int64_t cols, int64_t r0, int64_t r1);
void matmul_f32(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void matmul_act8(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
void swiglu(float* mid, const float* g, const float* u, int64_t n, float clamp, float weight);
void attention(const AttentionJob& job);
void indexer_scores(const IndexerJob& job, int64_t c0, int64_t c1, float* scores);
// One row's blocks [b0, b0 + nb) -> nb * block_weights(type) floats (shared by dequantize and matmul_f32).
void dequantize_blocks(float* out, const uint8_t* row, int type, int64_t b0, int64_t nb);
}  // namespace DS4_ISA
#endif

}  // namespace ds4::cpu
