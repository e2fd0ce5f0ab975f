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

struct IsaKernels {
    const char* name;
    // W rows [r0, r1) -> f32 rows [r0, r1) of out (rows, cols), bit for bit what gguf.quants.dequantize gives.
    void (*dequantize)(float* out, const uint8_t* w, int type, size_t row_bytes, int64_t cols, int64_t r0,
                       int64_t r1);
    // y rows [r0, r1) of tokens [t0, t1): f32 activations, an f32 dot per output in a fixed per-level order.
    void (*matmul_f32)(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
    // The same range from quantized activations, exactly as ds4_quant.h and matmul_act8.cpp define it.
    void (*matmul_act8)(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1);
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
// One row's blocks [b0, b0 + nb) -> nb * block_weights(type) floats (shared by dequantize and matmul_f32).
void dequantize_blocks(float* out, const uint8_t* row, int type, int64_t b0, int64_t nb);
}  // namespace DS4_ISA
#endif

}  // namespace ds4::cpu
