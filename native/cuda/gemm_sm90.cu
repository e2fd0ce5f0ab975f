// Prefill products of Q8_0 and F16 weights on Hopper's warpgroup tensor cores (wgmma), through CUTLASS. Q8_0: the
// matrix is dequantized to bf16 (each weight q * d rounded once, to nearest even) into the workspace and the
// activations rounded to bf16 beside it; F16: the weights as they are, the activations rounded to f16. A CUTLASS
// sm90 GEMM (TMA loads, warp-specialized persistent kernel, f32 accumulation) then writes y. gemm.cu's int8 path
// keeps its numerics (act8; F16 against activations in two f16 parts) for the other weight types, for other GPUs
// and builds without CUTLASS, and for few activation rows, where converting the whole matrix costs more than the
// wgmma saves (at 64-128 rows the two paths measured the same).
//
// Numerics: bf16 keeps 8 significant bits of each weight and activation, about what the act8 path keeps of the
// activations (8 bits against each 32-value block's largest); f16 activations keep 11 (the two-part path ~22),
// as cuBLAS-based prefill does with F16 weights; products and sums in f32. The spec's "dequantize to bf16"
// (PERFORMANCE.md). Tests bound the result against the f64 product of the rounded operands.
//
// Built when CMake finds the CUTLASS headers (the nvidia-cutlass package; DS4_CUTLASS), else every entry point
// says the path is absent and gemm.cu takes the int8 path.
#include "common.cuh"

#if defined(DS4_CUTLASS)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#endif

namespace ds4::cuda {

#if defined(DS4_CUTLASS)
namespace {

using namespace cute;
using Bf16 = cutlass::bfloat16_t;
using F16 = cutlass::half_t;

// Y (M tokens x N weight rows, row-major, f32) = X (M x K, row-major) . W^T (W: N x K, row-major: CUTLASS's
// column-major B), L groups apart (attn_output_a's block-diagonal product), both operands of type E (bf16 for Q8_0
// weights, f16 for F16 ones).
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 4, float,
    cutlass::layout::RowMajor, 4, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;
template <typename E>
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, 8, E,
    cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;
template <typename E>
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop<E>, Epilogue>>;

template <typename E>
typename Gemm<E>::Arguments arguments(float* y, int64_t y_stride, const E* w, int64_t rows, int64_t cols,
                                      const E* x, int n_tok, int groups) {
    using K = typename Gemm<E>::GemmKernel;
    typename K::StrideA sa = make_stride(cols * groups, Int<1>{}, cols);
    typename K::StrideB sb = make_stride(cols, Int<1>{}, rows * cols);
    typename K::StrideD sd = make_stride(y_stride, Int<1>{}, rows);
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = props().sms;
    return {cutlass::gemm::GemmUniversalMode::kBatched,
            {n_tok, (int)rows, (int)cols, groups},
            {x, sa, w, sb},
            {{1.0f, 0.0f}, nullptr, typename K::StrideC{}, y, sd},
            hw};
}

// Q8_0 rows to bf16: a thread per 32-weight block (its 34 bytes read as 17 halves: blocks are 2-byte aligned).
__global__ void dequant_q8_0_kernel(__nv_bfloat16* out, const uint8_t* w, int64_t n_blocks) {
    pdl_trigger();
    pdl_wait();
    for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < n_blocks;
         b += (int64_t)gridDim.x * blockDim.x) {
        const uint16_t* p = (const uint16_t*)(w + 34 * b);
        uint16_t h[17];
#pragma unroll
        for (int i = 0; i < 17; ++i) h[i] = p[i];
        const float d = __half2float(__ushort_as_half(h[0]));
        uint32_t o[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float lo = (float)(int8_t)(h[1 + i] & 255) * d, hi = (float)(int8_t)(h[1 + i] >> 8) * d;
            const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
            o[i] = *(const uint32_t*)&v;
        }
        uint4* dst = (uint4*)(out + 32 * b);
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
    }
}

// Activation rows to packed E: a thread per 8 values (f16: clamped to its range, which the normed inputs of the
// F16 products stay far inside).
template <typename E>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<cutlass::bfloat16_t>(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *(const uint32_t*)&v;
}
template <>
__device__ __forceinline__ uint32_t pack2<cutlass::half_t>(float a, float b) {
    const __half2 v = __floats2half2_rn(fminf(fmaxf(a, -65504.0f), 65504.0f), fminf(fmaxf(b, -65504.0f), 65504.0f));
    return *(const uint32_t*)&v;
}
template <typename E>
__global__ void convert_kernel(E* out, const float* x, int64_t x_stride, int n, int64_t cols) {
    pdl_trigger();
    pdl_wait();
    const int64_t per_row = cols / 8, total = per_row * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / per_row, c = 8 * (i - r * per_row);
        const float4 a = *(const float4*)(x + r * x_stride + c), b = *(const float4*)(x + r * x_stride + c + 4);
        *(uint4*)(out + r * cols + c) = make_uint4(pack2<E>(a.x, a.y), pack2<E>(a.z, a.w), pack2<E>(b.x, b.y),
                                                   pack2<E>(b.z, b.w));
    }
}

// The workspace: the bf16 weights (Q8_0; F16 weights are used as they are), the activations, then CUTLASS's own
// (16-byte aligned pieces).
struct Sm90Work {
    size_t w, x, cutlass, bytes;
    Sm90Work(int type, int n_tok, int64_t rows, int64_t cols, int groups) {
        w = type == TYPE_Q8_0 ? (size_t)(2 * rows * cols * groups + 15) / 16 * 16 : 0;
        x = (size_t)(2 * (int64_t)n_tok * cols * groups + 15) / 16 * 16;
        const size_t c = type == TYPE_Q8_0
            ? Gemm<Bf16>::get_workspace_size(arguments<Bf16>(nullptr, rows * groups, nullptr, rows, cols, nullptr,
                                                             n_tok, groups))
            : Gemm<F16>::get_workspace_size(arguments<F16>(nullptr, rows * groups, nullptr, rows, cols, nullptr,
                                                           n_tok, groups));
        cutlass = (c + 15) / 16 * 16;
        bytes = w + x + cutlass;
    }
};

template <typename E>
cudaError_t run(cudaStream_t s, float* y, int64_t y_stride, const E* w, int64_t rows, int64_t cols, const E* x,
                int n_tok, int groups, void* work) {
    Gemm<E> gemm;
    const auto args = arguments<E>(y, y_stride, w, rows, cols, x, n_tok, groups);
    if (gemm.initialize(args, work, s) == cutlass::Status::kSuccess && gemm.run(s) == cutlass::Status::kSuccess)
        return cudaSuccess;
    const cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? e : cudaErrorLaunchFailure;
}

// Whether CUTLASS takes the shape (its alignment rules on the extents and strides; the pointers are ours).
template <typename E>
bool implementable(int64_t y_stride, int64_t rows, int64_t cols, int n_tok, int groups) {
    return Gemm<E>::can_implement(arguments<E>(nullptr, y_stride, nullptr, rows, cols, nullptr, n_tok, groups)) ==
           cutlass::Status::kSuccess;
}

unsigned grid_for(int64_t items) { return (unsigned)std::min<int64_t>(ceil_div(items, 256), 16 * props().sms); }

}  // namespace

bool gemm_sm90_ok(int type, const float* y, int64_t y_stride, int64_t rows, int n_tok) {
    return (type == TYPE_Q8_0 || type == TYPE_F16) && props().cc == 90 && n_tok >= kGemmSm90MinTok &&
           (uintptr_t)y % 16 == 0 && y_stride % 4 == 0 && rows % 4 == 0;
}

size_t gemm_sm90_work_bytes(int type, int n_tok, int64_t rows, int64_t cols, int groups) {
    return Sm90Work(type, n_tok, rows, cols, groups).bytes;
}

cudaError_t gemm_sm90(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                      int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work) {
    if (!(type == TYPE_F16 ? implementable<F16>(y_stride, rows, cols, n_tok, groups)
                           : implementable<Bf16>(y_stride, rows, cols, n_tok, groups)))
        return cudaErrorNotSupported;  // the int8 path then
    const Sm90Work sz(type, n_tok, rows, cols, groups);
    uint8_t* xe = (uint8_t*)work + sz.w;
    void* cw = xe + sz.x;
    const int64_t n_x = (int64_t)n_tok * cols * groups / 8;
    if (type == TYPE_F16) {
        cudaError_t e = launch(convert_kernel<F16>, dim3(grid_for(n_x)), dim3(256), 0, s, (F16*)xe, x, x_stride, n_tok,
                               cols * groups);
        return e != cudaSuccess ? e : run<F16>(s, y, y_stride, (const F16*)w, rows, cols, (const F16*)xe, n_tok, groups,
                                               cw);
    }
    const int64_t n_blocks = rows * groups * (cols / 32);
    cudaError_t e = launch(dequant_q8_0_kernel, dim3(grid_for(n_blocks)), dim3(256), 0, s, (__nv_bfloat16*)work,
                           (const uint8_t*)w, n_blocks);
    if (e == cudaSuccess)
        e = launch(convert_kernel<Bf16>, dim3(grid_for(n_x)), dim3(256), 0, s, (Bf16*)xe, x, x_stride, n_tok,
                   cols * groups);
    return e != cudaSuccess ? e : run<Bf16>(s, y, y_stride, (const Bf16*)work, rows, cols, (const Bf16*)xe, n_tok,
                                            groups, cw);
}

#else

bool gemm_sm90_ok(int, const float*, int64_t, int64_t, int) { return false; }
size_t gemm_sm90_work_bytes(int, int, int64_t, int64_t, int) { return 0; }
cudaError_t gemm_sm90(cudaStream_t, float*, int64_t, const void*, int, int64_t, int64_t, const float*, int64_t, int,
                      int, void*) {
    return invalid("gemm: built without CUTLASS");
}

#endif

}  // namespace ds4::cuda
