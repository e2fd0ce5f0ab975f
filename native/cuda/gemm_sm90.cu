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

#include <type_traits>

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

// Whether this device and call size take the path (gemm_sm90_ok adds y's alignment).
bool takes(int type, int n_tok) {
    return (type == TYPE_Q8_0 || type == TYPE_F16) && props().cc == 90 && n_tok >= kGemmSm90MinTok;
}

// The workspace: the bf16 weights (Q8_0; F16 weights are used as they are), the activations, then CUTLASS's own
// (16-byte aligned pieces).
struct Sm90Work {
    size_t w, x, cutlass, bytes;
    template <typename E>
    Sm90Work(E*, int n_tok, int64_t rows, int64_t cols, int groups) {
        w = std::is_same_v<E, Bf16> ? (size_t)(2 * rows * cols * groups + 15) / 16 * 16 : 0;
        x = (size_t)(2 * (int64_t)n_tok * cols * groups + 15) / 16 * 16;
        cutlass = (Gemm<E>::get_workspace_size(arguments<E>(nullptr, rows * groups, nullptr, rows, cols, nullptr,
                                                             n_tok, groups)) + 15) / 16 * 16;
        bytes = w + x + cutlass;
    }
};

// The product with operands of type E: nothing launched (cudaErrorNotSupported) where CUTLASS refuses the shape;
// else the Q8_0 weights dequantized (E = bf16), the activations converted, and the GEMM.
template <typename E>
cudaError_t product(cudaStream_t s, float* y, int64_t y_stride, const void* w, int64_t rows, int64_t cols,
                    const float* x, int64_t x_stride, int n_tok, int groups, uint8_t* work) {
    const Sm90Work sz((E*)nullptr, n_tok, rows, cols, groups);
    const E* we = (const E*)w;
    E* xe = (E*)(work + sz.w);
    const auto args = arguments<E>(y, y_stride, std::is_same_v<E, Bf16> ? (const E*)work : we, rows, cols, xe,
                                   n_tok, groups);
    if (Gemm<E>::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    cudaError_t e = cudaSuccess;
    if constexpr (std::is_same_v<E, Bf16>) {
        const int64_t n_blocks = rows * groups * (cols / 32);
        e = launch(dequant_q8_0_kernel, dim3(capped_grid(ceil_div(n_blocks, 256))), dim3(256), 0, s,
                   (__nv_bfloat16*)work, (const uint8_t*)w, n_blocks);
    }
    if (e == cudaSuccess)
        e = launch(convert_kernel<E>, dim3(capped_grid(ceil_div((int64_t)n_tok * cols * groups / 8, 256))),
                   dim3(256), 0, s, xe, x, x_stride, n_tok, cols * groups);
    if (e != cudaSuccess) return e;
    Gemm<E> gemm;
    if (gemm.initialize(args, work + sz.w + sz.x, s) == cutlass::Status::kSuccess &&
        gemm.run(s) == cutlass::Status::kSuccess)
        return cudaSuccess;
    e = cudaGetLastError();
    return e != cudaSuccess ? e : cudaErrorLaunchFailure;
}

}  // namespace

bool gemm_sm90_ok(int type, const float* y, int64_t y_stride, int64_t rows, int n_tok) {
    return takes(type, n_tok) && (uintptr_t)y % 16 == 0 && y_stride % 4 == 0 && rows % 4 == 0;
}

size_t gemm_sm90_work_bytes(int type, int n_tok, int64_t rows, int64_t cols, int groups) {
    if (!takes(type, n_tok) || rows < 1 || groups < 1) return 0;
    return type == TYPE_F16 ? Sm90Work((F16*)nullptr, n_tok, rows, cols, groups).bytes
                            : Sm90Work((Bf16*)nullptr, n_tok, rows, cols, groups).bytes;
}

cudaError_t gemm_sm90(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                      int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work) {
    return type == TYPE_F16
               ? product<F16>(s, y, y_stride, w, rows, cols, x, x_stride, n_tok, groups, (uint8_t*)work)
               : product<Bf16>(s, y, y_stride, w, rows, cols, x, x_stride, n_tok, groups, (uint8_t*)work);
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
