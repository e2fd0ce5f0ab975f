// The C++ entry points of ds4d._cpu, called by the binding file (binding.cpp), which has already checked every
// argument: types are supported, cols is a whole number of blocks, buffers are large enough and strides sane.
//
// Arguments go (outputs..., inputs..., params). Strides are in elements. All of these may run on the thread pool
// and must be called without the GIL.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ds4_quant.h"

// ---- configuration ---------------------------------------------------------------------------------------------

// Reads DS4_CPU_ISA (an unavailable level throws std::runtime_error) and DS4_THREADS; called once at import.
void ds4_cpu_init();
// The levels both built into this module and supported by this CPU, worst first: "portable", "avx2", "avx512".
std::vector<std::string> ds4_cpu_available_isas();
const char* ds4_cpu_isa();
bool ds4_cpu_set_isa(const std::string& name);  // false (and no change) if the level is not available
void ds4_cpu_set_threads(int n);
int ds4_cpu_threads();

// ---- ops -----------------------------------------------------------------------------------------------------

// rows rows of `type` (row_bytes(type, cols) bytes each) -> f32 (rows, cols), exactly as gguf.quants.dequantize.
void ds4_cpu_dequantize(float* out, const uint8_t* w, int type, int64_t rows, int64_t cols);

// y[t, o] = sum_i W[o, i] x[t, i] for t < n_tokens, o < rows. act8 selects the integer product with quantized
// activations (quantized types only; ds4_quant.h), otherwise each output is an f32 dot in a fixed order.
void ds4_cpu_matmul(float* y, int64_t y_stride, const uint8_t* w, int type, int64_t rows, int64_t cols,
                    const float* x, int64_t x_stride, int64_t n_tokens, bool act8);

// The activation quantizer of the act8 product: n_tokens rows of cols values -> n_tokens quantized rows at out,
// act_row_layout(cols, block).bytes apart; block 32 gives Q8_0 activations, 256 gives Q8_K (ds4_quant.h).
void ds4_cpu_quantize_act(uint8_t* out, const float* x, int64_t x_stride, int64_t n_tokens, int64_t cols, int block);

// ---- module internals (dispatch.cpp -> matmul.cpp) -----------------------------------------------------------

namespace ds4::cpu {
struct IsaKernels;
class ThreadPool;
const IsaKernels& active_kernels();
ThreadPool& pool();
}  // namespace ds4::cpu
