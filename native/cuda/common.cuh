// Shared machinery of the CUDA kernels: launching (with programmatic dependent launch), argument errors, device
// properties, and the small device helpers every kernel file uses (asynchronous copies, warp reductions, the
// dependent-launch wait). Included by every .cu file; owns no kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "ds4_cuda.h"
#include "ds4_quant.h"

namespace ds4::cuda {

// ---- host side -------------------------------------------------------------------------------------------------

// Records why an op refused its arguments (ds4_cuda_error_message) and returns cudaErrorInvalidValue.
cudaError_t invalid(const std::string& why);
void clear_error();

struct DeviceProps {
    int sms = 0;
    int cc = 0;                // major * 10 + minor
    size_t smem_optin = 0;     // dynamic shared memory a block may opt in to
};
const DeviceProps& props();   // of the current device, read once
bool pdl_enabled();            // programmatic dependent launch: on, and the device supports it

// Raises a kernel's dynamic shared memory limit once (per kernel, for the current process).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return cudaSuccess;
    if (bytes > props().smem_optin) return invalid("needs " + std::to_string(bytes) + " bytes of shared memory; " +
                                                   "this device allows " + std::to_string(props().smem_optin));
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

// How many blocks of `threads` threads and `smem` bytes fit on the whole device at once (at least one per SM).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess || per_sm < 1)
        per_sm = 1;
    return per_sm * props().sms;
}

// The launch attribute of thread block clusters of `cluster` blocks (sm_90).
inline cudaLaunchAttribute cluster_dim(dim3 cluster) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim = {cluster.x, cluster.y, cluster.z};
    return attr;
}

// Launches with the programmatic-stream-serialization attribute when dependent launch is on, in thread block
// clusters of `cluster` blocks when that is more than one (sm_90); returns the launch's error.
template <typename... KArgs, typename... Args>
cudaError_t launch_cluster(dim3 cluster, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t s, Args&&... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[2];
    unsigned n = 0;
    if (pdl_enabled()) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster.x * cluster.y * cluster.z > 1) attr[n++] = cluster_dim(cluster);
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
    return launch_cluster(dim3(1), kernel, grid, block, smem, s, std::forward<Args>(args)...);
}

// How many clusters of `cluster` blocks of `kernel` (block threads, smem bytes of dynamic shared memory) the
// device runs at once: 0 where it has no clusters (before sm_90) or refuses. Clusters of more than 8 blocks opt in
// to the non-portable limit (16 on Hopper). Asks the driver: callers keep the answer.
template <typename... KArgs>
int cluster_fit(void (*kernel)(KArgs...), dim3 cluster, dim3 block, size_t smem) {
    const unsigned n = cluster.x * cluster.y * cluster.z;
    int fit = 0;
    if (props().cc >= 90 && allow_smem(kernel, smem) == cudaSuccess &&
        (n <= 8 || cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr = cluster_dim(cluster);
        cfg.gridDim = cluster;
        cfg.blockDim = block;
        cfg.dynamicSmemBytes = smem;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        if (cudaOccupancyMaxActiveClusters(&fit, kernel, &cfg) != cudaSuccess) fit = 0;
    }
    cudaGetLastError();  // a refusal leaves nothing behind: the caller takes its path without clusters
    clear_error();
    return fit;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A grid-stride kernel's blocks: one per work item (a row, or 256 elements), at most 16 per SM.
inline unsigned capped_grid(int64_t blocks) { return (unsigned)std::min<int64_t>(blocks, 16 * props().sms); }

// n / d for 0 <= n < 2^31 and a divisor d >= 1 fixed at launch: a multiply-high, an add and a shift instead of
// the ~25 instructions of an integer division (Granlund and Montgomery's magic number, made on the host).
struct FastDiv {
    uint32_t m = 1, l = 0;  // d = 1 by default
    FastDiv() = default;
    explicit FastDiv(uint32_t d) {
        while ((1ull << l) < d) ++l;
        m = (uint32_t)((((1ull << l) - d) << 32) / d + 1);
    }
    __device__ __forceinline__ int div(int n) const { return (int)((__umulhi((uint32_t)n, m) + (uint32_t)n) >> l); }
};

// Writes n activation rows into `work` as the tensor-core products read them (gemm.cu): the act8 blocks of the
// quantized types (IQ2_XXS's qs in quantize_rows' PAIRS order, the K types' sums per 16 as f16), or for F16
// weights two f16 planes (each row scaled by a power of two: high parts, then the rounding of the rest) and a
// float scale per row.
cudaError_t quantize_into(cudaStream_t s, uint8_t* work, const float* x, int64_t x_stride, int64_t n, int64_t cols,
                          int type);
// ds4_cuda_quantize_act's kernel, unchecked. order (kind 256): the CPU's, or quantize_rows' PAIRS or F16_SUMS.
constexpr int kActCpu = 0, kActPairs = 1, kActF16Sums = 2;
cudaError_t quantize_act(cudaStream_t s, int8_t* qs, float* d, int16_t* bsums, const float* x, int64_t x_stride,
                         int n_tok, int64_t cols, int kind, int order);

// Q8_0 and F16 prefill products on Hopper's wgmma through CUTLASS (gemm_sm90.cu; absent in builds without
// CUTLASS): whether it takes a product of n_tok activation rows (an sm_90 device, at least kGemmSm90MinTok rows, y
// 16-byte aligned with rows of a multiple of 4 floats), its workspace (0 where the type, device or n_tok rule it
// out), and the product (ds4_cuda_gemm's arguments; cudaErrorNotSupported, having launched nothing, where CUTLASS
// refuses the shape).
constexpr int kGemmSm90MinTok = 64;
bool gemm_sm90_ok(int type, const float* y, int64_t y_stride, int64_t rows, int n_tok);
size_t gemm_sm90_work_bytes(int type, int n_tok, int64_t rows, int64_t cols, int groups);
cudaError_t gemm_sm90(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                      int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work);

// ---- device side -----------------------------------------------------------------------------------------------

// Waits until the kernel launched before this one on the stream has completed and its writes are visible (a
// no-op when it was not launched as a dependent). Every kernel calls it before touching activations.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Lets the next kernel on the stream start its prologue (it still waits for this kernel's completion before
// reading what this one writes).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// The Q8_0 activation block of ds4_quant.h (32 values), as the CPU rounds it: d = amax / 127, and each value
// clamp(rint(x * inv), -127, 127) with inv = 1 / d (0 for an all-zero block). The quantizers of qdot.cuh and the
// attention combine's Q8_0 output share these.
__device__ __forceinline__ float q8_0_inv(float amax, float& d) {
    d = amax / 127.0f;
    return d != 0.0f ? 1.0f / d : 0.0f;
}
__device__ __forceinline__ int q8_0_value(float x, float inv) {
    return (int)fminf(fmaxf(rintf(__fmul_rn(x, inv)), -127.0f), 127.0f);
}

// Barrier `id` (1-15; 0 is __syncthreads) over `count` threads, whole warps; named_arrive counts the warp in
// without waiting (its earlier shared-memory writes are seen by the threads that wait at the barrier).
__device__ __forceinline__ void named_barrier(int id, int count) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// Thread block clusters (sm_90; elsewhere a kernel's cluster is its one block and these do nothing). The
// cluster's barrier, a pointer into block `rank`'s shared memory, and the barrier in two halves: arrive (relaxed: it
// orders nothing, only says the block has started; or with release: this thread's writes, to any block's shared
// memory, are seen after the matching wait) and wait (acquire). A thread alternates arrive and wait.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();
#endif
}
template <typename T>
__device__ __forceinline__ T* cluster_at(T* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
    return p;
#endif
}
// A 32-bit load from block `rank`'s shared memory at the place of p in this block's (mapa and ld in one asm: the
// address is formed at the load, not kept in a register for every rank). Volatile: it stays between the cluster
// barriers around it.
__device__ __forceinline__ uint32_t cluster_ld(const uint32_t* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t v;
    asm volatile("{\n\t.reg .u32 a;\n\tmapa.shared::cluster.u32 a, %1, %2;\n\tld.shared::cluster.u32 %0, [a];\n\t}"
                 : "=r"(v) : "r"((uint32_t)__cvta_generic_to_shared(p)), "r"(rank));
    return v;
#else
    return *p;
#endif
}
// Adds v to the word at the place of p in block `rank`'s shared memory.
__device__ __forceinline__ void cluster_red_add(uint32_t* p, int rank, uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .u32 a;\n\tmapa.shared::cluster.u32 a, %0, %1;\n\tred.shared::cluster.add.u32 [a], %2;\n\t}"
                 ::"r"((uint32_t)__cvta_generic_to_shared(p)), "r"(rank), "r"(v) : "memory");
#else
    atomicAdd(p, v);
#endif
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// 16-byte asynchronous global -> shared copy (sm_80+), cached in L2 only: weights are read once per step.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
// The same copy for a weight stream, with an L2 eviction priority. A decode layer streams ~200 MB of weights through
// the 50 MB L2; where each is read once (one token), marked evict-first they no longer push out what every layer
// reads again: the kernels' code, whose cold instruction fetches after each dependency wait otherwise go to DRAM
// (the attention's front: ~3 us of its ~10 at one token), and the activations. Where a batch's tokens share
// experts, normal priority keeps the second reader's L2 hits (evict-first on them cost batch 8 1.5%).
__device__ __forceinline__ uint64_t l2_evict_first() {
    uint64_t p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ uint64_t l2_evict_normal() {
    uint64_t p;
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ void cp_async16_stream(uint32_t smem, const void* gmem, uint64_t policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "l"(policy)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The shared-memory address of p, as ldmatrix and cp.async take it.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 8 x 16-byte matrices of shared memory, one register each (4 or 2 matrices); lanes 8 m .. 8 m + 7 give matrix m's
// row addresses. With .trans each register holds a column pair of its matrix (mma B fragments of row-major rows).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}

// ss + the squares of v's four values, in order (the norm's sum of squares, one chain per thread).
__device__ __forceinline__ float sumsq4(float4 v, float ss) {
    ss = fmaf(v.x, v.x, ss), ss = fmaf(v.y, v.y, ss);
    ss = fmaf(v.z, v.z, ss), ss = fmaf(v.w, v.w, ss);
    return ss;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Several warp sums in one butterfly: a step over lane distance o where the lane carries two values keeps the one
// for its half (lane & o: b, else a) plus its partner's copy of it, so that each half goes on with one value
// (the pairs added are warp_sum's: each result is bit for bit warp_sum's).
__device__ __forceinline__ float fold_halves(float a, float b, int o) {
    const bool hi = threadIdx.x & o;
    return (hi ? b : a) + __shfl_xor_sync(0xffffffffu, hi ? a : b, o);
}
// N warp sums (N a power of two up to 32) in N - 1 + log2(32 / N) shuffles instead of 5 N: lane l gets the sum of
// a[l / (32 / N)] (a is consumed). N = 2: lanes 0-15 get a[0]'s sum, 16-31 a[1]'s.
template <int N>
__device__ __forceinline__ float warp_sums(float (&a)[N]) {
    static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "warp_sums: N is a power of two up to 32");
#pragma unroll
    for (int m = N, o = 16; m > 1; m >>= 1, o >>= 1)
#pragma unroll
        for (int i = 0; i < m / 2; ++i) a[i] = fold_halves(a[i], a[i + m / 2], o);
    float v = a[0];
#pragma unroll
    for (int o = 16 / N; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// The maximum over the calling lane's aligned group of 8 lanes (8k .. 8k + 7): a 32-value block held 4 per lane.
__device__ __forceinline__ float group8_max(float v) {
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Tensor-core int8 product m16n8k32 (sm_80+), row-major A (16 x 32) by column-major B (32 x 8): c += a b. Lane
// (g, t) = (lane / 4, lane % 4) holds A's rows g and g + 8 at bytes 4t and 16 + 4t (a[0], a[1] for the first
// bytes of rows g and g + 8, a[2], a[3] for the second), B's column g at the same bytes (b[0], b[1]), and C's
// rows g, g + 8 by columns 2t, 2t + 1 (c[0], c[1], c[2], c[3]).
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// The same product into fresh accumulators (C = 0: no zeroed registers to set up per mma).
__device__ __forceinline__ void mma_s8_new(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
}

// The f16 product m16n8k16 into f32 (sm_80+): the same lane layout with 2 f16 per 32-bit register (A's halves
// 2t, 2t + 1 and 8 + 2t, 9 + 2t of its rows g, g + 8; B's of its column g).
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Inclusive prefix over the warp's lanes of v (lane l: the sum of lanes 0 .. l); every lane calls it.
template <typename T>
__device__ __forceinline__ T warp_inclusive(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

// Exclusive prefix over the block's threads of v; every thread gets the block's total in *total. Every thread of
// the block calls it; sh: one T per warp of shared memory.
template <typename T>
__device__ __forceinline__ T block_exclusive(T v, T* sh, T* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warp = blockDim.x >> 5;
    const T inc = warp_inclusive(v);
    if (lane == 31) sh[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const T w = warp_inclusive(lane < n_warp ? sh[lane] : T(0));
        if (lane < n_warp) sh[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const T before = (warp ? sh[warp - 1] : T(0)) + inc - v;
    *total = sh[n_warp - 1];
    __syncthreads();  // sh is reused
    return before;
}

// Order-preserving integer key of a float (larger float, larger key; -0 as +0, so that equal floats have equal
// keys), and the float of a key.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The k-th largest (1 <= k <= n) of n keys spread over the block's threads, by radix select: 4 passes of an 8-bit
// histogram over the keys that share the prefix found so far, whole warps adding once per distinct bin of their
// keys (the top bytes mostly agree: lane-wise adds serialize) and skipping keys of which none is in; then warp 0
// finds the bin holding it, each lane summing 8 bins from the top, two barriers per pass. each_key(f) calls f(key,
// i) for each key of the calling thread (i: its index, or -1 for a slot holding none), the same number of times in
// every lane of a warp (f meets its lanes in warp-wide operations). Returns the key; *take_eq is how many of the
// keys equal to it are among the k largest (the lowest indices, for an order by value then index). Every thread of
// the block calls it; hist: 512 words, sel: 4 ints of shared memory, which the block must pass a barrier before it
// writes again.
template <typename EachKey>
__device__ __forceinline__ uint32_t radix_select_each(EachKey each_key, int k, uint32_t* hist, int* sel, int* take_eq) {
    const int lane = threadIdx.x & 31;
    uint32_t prefix = 0, mask = 0;
    int need = k;
    for (int b = threadIdx.x; b < 512; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    // Two histograms taken in turn, and warp 0 clears the one it has read: two barriers per pass.
    for (int shift = 24, pass = 0; shift >= 0; shift -= 8, ++pass) {
        uint32_t* h = hist + 256 * (pass & 1);
        int* sp = sel + 2 * (pass & 1);
        each_key([&](uint32_t key, int i) {
            const bool in = i >= 0 && (key & mask) == prefix;
            if (!__any_sync(0xffffffffu, in)) return;
            const uint32_t bin = (key >> shift) & 255u;
            const uint32_t peers = __match_any_sync(0xffffffffu, in ? bin : 256u);
            if (in && lane == __ffs(peers) - 1) atomicAdd(&h[bin], (uint32_t)__popc(peers));
        });
        __syncthreads();
        if (threadIdx.x < 32) {  // lane l owns the bins 255 - 8 l down to 248 - 8 l
            uint32_t c[8], sum = 0;
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                sum += c[b] = h[255 - 8 * lane - b];
                h[255 - 8 * lane - b] = 0;
            }
            const uint32_t incl = warp_inclusive(sum);
            if (lane == __ffs(__ballot_sync(0xffffffffu, incl >= (uint32_t)need)) - 1) {
                uint32_t above = incl - sum;
                int b = 0;
#pragma unroll
                for (int j = 0; j < 7; ++j)  // the bin holding it (unrolled: c stays in registers)
                    if (b == j && above + c[j] < (uint32_t)need) above += c[j], b = j + 1;
                sp[0] = 255 - 8 * lane - b;
                sp[1] = need - (int)above;
            }
        }
        __syncthreads();
        prefix |= (uint32_t)sp[0] << shift;
        mask |= 255u << shift;
        need = sp[1];
    }
    *take_eq = need;
    return prefix;
}

// Warp 0 of the block: the bin of h[0 .. NB) holding the need-th largest key counting from the top bin, into sp[0],
// and how many of the keys in it are among them, into sp[1]. Each lane sums NB / 32 bins, a scan over the lanes finds
// the lane holding it, then the warp takes that lane's bins NB / 1024 each and the same again.
template <int NB>
__device__ __forceinline__ void find_bin(const uint32_t* h, int need, int* sp) {
    constexpr int kPer = NB / 32, kPer2 = kPer / 32;
    static_assert(kPer2 >= 1 && kPer2 <= 4, "find_bin: 1,024 to 4,096 bins");
    const int lane = threadIdx.x & 31;
    uint32_t sum = 0;
    const uint32_t* mine = h + NB - kPer * (lane + 1);
#pragma unroll 8
    for (int i = 0; i < kPer; i += 4) {  // lane l from word 4 l on: the 8 lanes of a load phase on distinct banks
        const uint4 v = *(const uint4*)(mine + (i + 4 * lane) % kPer);
        sum += v.x + v.y + v.z + v.w;
    }
    uint32_t incl = warp_inclusive(sum);
    const int owner = __ffs(__ballot_sync(0xffffffffu, incl >= (uint32_t)need)) - 1;
    uint32_t above = __shfl_sync(0xffffffffu, incl - sum, owner);
    const uint32_t* sub = h + NB - kPer * (owner + 1) + kPer - kPer2 * (lane + 1);  // lane l's bins, from the top
    uint32_t c[kPer2];
    sum = 0;
#pragma unroll
    for (int b = 0; b < kPer2; ++b) sum += c[b] = sub[kPer2 - 1 - b];
    incl = above + warp_inclusive(sum);
    if (lane == __ffs(__ballot_sync(0xffffffffu, incl >= (uint32_t)need)) - 1) {
        above = incl - sum;
        int b = 0;
#pragma unroll
        for (int j = 0; j + 1 < kPer2; ++j)
            if (b == j && above + c[j] < (uint32_t)need) above += c[j], b = j + 1;
        sp[0] = (int)(sub - h) + kPer2 - 1 - b;
        sp[1] = need - (int)above;
    }
}

constexpr int kWideHistWords = 4096 + 2 * 1024;  // radix_select_wide's three passes' bins

// A pass of radix_select_wide after the block's keys are counted in h (NB bins): the bin holding the need-th largest
// key of the block, and the count, in sp for every thread of the block. start: before the first pass, after hist is
// cleared.
struct BlockBins {
    __device__ __forceinline__ void start() const {}
    template <int NB>
    __device__ __forceinline__ void operator()(std::integral_constant<int, NB>, uint32_t* h, int need, int* sp) const {
        __syncthreads();
        if (threadIdx.x < 32) find_bin<NB>(h, need, sp);
        __syncthreads();
    }
};

// The same over the keys of a thread block cluster of C blocks of T threads: each block counts its own keys, then
// adds its counts of slice r of the bins (NB / C of them) into the `tot` of the cluster's block r (this pass's region
// of kWideHistWords / C words), and after the cluster's barrier every block gathers the C slices' sums into h and
// finds the bin in it. One cluster barrier per pass; every pass has its own bins and sums, so no block writes what
// another may still read. start clears tot; the first pass's adds wait for every block's clearing.
template <int C, int T>
struct ClusterBins {
    const uint32_t* hist;  // the block's kWideHistWords (the passes' h lie in it)
    uint32_t* tot;
    __device__ __forceinline__ void start() const {
        for (int b = threadIdx.x; b < kWideHistWords / C; b += T) tot[b] = 0;
        cluster_arrive();  // waited for by the first pass, after the block has counted its keys
    }
    template <int NB>
    __device__ __forceinline__ void operator()(std::integral_constant<int, NB>, uint32_t* h, int need, int* sp) const {
        constexpr int S = NB / C, kPer = (NB + T - 1) / T;
        uint32_t* mine = tot + (h - hist) / C;
        __syncthreads();  // the block's counts are in h
        if constexpr (NB == 4096) cluster_wait();  // the first pass: every block's tot is clear
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const int b = threadIdx.x + j * T;
            if (b < NB && h[b]) cluster_red_add(mine + b % S, b / S, h[b]);
        }
        cluster_sync();  // every block's counts are in their slices' blocks
        uint32_t v[kPer];
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
            const int b = threadIdx.x + j * T;
            v[j] = b < NB ? cluster_ld(mine + b % S, b / S) : 0u;
        }
#pragma unroll
        for (int j = 0; j < kPer; ++j)
            if (threadIdx.x + j * T < NB) h[threadIdx.x + j * T] = v[j];
        BlockBins{}(std::integral_constant<int, NB>{}, h, need, sp);  // the cluster's counts are the block's now
    }
};

// radix_select_each's result in 3 passes of 12, 10 and 10 bits with a lane-wise add per key: the first digit, the
// sign, exponent and three mantissa bits of a float's key, spreads the keys of a warp over many bins (the 8-bit one
// puts most of them in two or three, which only a match over the warp's lanes per key kept from serializing:
// the match dominated a pass over 16K keys). hist: kWideHistWords words of shared memory, 16-byte aligned. bins:
// BlockBins (the block's keys), or ClusterBins (the keys of the block's cluster; every block gets the same result).
template <typename EachKey, typename Bins = BlockBins>
__device__ __forceinline__ uint32_t radix_select_wide(EachKey each_key, int k, uint32_t* hist, int* sel,
                                                      int* take_eq, Bins bins = {}) {
    for (int b = threadIdx.x; b < kWideHistWords; b += blockDim.x) hist[b] = 0;
    bins.start();
    __syncthreads();
    uint32_t prefix = 0, mask = 0;
    int need = k;
    auto pass = [&](auto nb, int shift, uint32_t* h, int* sp) {
        constexpr int NB = decltype(nb)::value;
        each_key([&](uint32_t key, int i) {
            if (i >= 0 && (key & mask) == prefix) atomicAdd(&h[(key >> shift) & (NB - 1)], 1u);
        });
        bins(nb, h, need, sp);
        prefix |= (uint32_t)sp[0] << shift;
        mask |= (uint32_t)(NB - 1) << shift;
        need = sp[1];
    };
    pass(std::integral_constant<int, 4096>{}, 20, hist, sel);
    pass(std::integral_constant<int, 1024>{}, 10, hist + 4096, sel + 2);
    pass(std::integral_constant<int, 1024>{}, 0, hist + 5120, sel);
    *take_eq = need;
    return prefix;
}

// Calls f(key_at(i), i) for i = at(j), j < m, of the calling thread (i >= n or j >= m: f(0, -1)), kSelectBatch keys
// read together (their loads in flight at once); m must be the same in every lane of a warp.
constexpr int kSelectBatch = 8;
template <typename KeyAt, typename At, typename F>
__device__ __forceinline__ void each_key_batched(KeyAt key_at, At at, int m, int n, F f) {
    for (int j0 = 0; j0 < m; j0 += kSelectBatch) {
        uint32_t b[kSelectBatch];
#pragma unroll
        for (int j = 0; j < kSelectBatch; ++j) {
            const int i = at(j0 + j);
            b[j] = j0 + j < m && i < n ? key_at(i) : 0u;
        }
#pragma unroll
        for (int j = 0; j < kSelectBatch; ++j) {
            const int i = at(j0 + j);
            f(b[j], j0 + j < m && i < n ? i : -1);
        }
    }
}

// radix_select_each over the keys key_at(0 .. n - 1), thread x taking x, x + blockDim.x, ...
template <typename KeyAt>
__device__ uint32_t radix_select(KeyAt key_at, int n, int k, uint32_t* hist, int* sel, int* take_eq) {
    const int first = threadIdx.x & ~31;  // the warp's: its lanes loop alike
    const int m = first < n ? (int)ceil_div(n - first, blockDim.x) : 0;
    auto each_key = [&](auto f) {
        each_key_batched(key_at, [&](int j) { return (int)threadIdx.x + j * (int)blockDim.x; }, m, n, f);
    };
    return radix_select_each(each_key, k, hist, sel, take_eq);
}

__device__ __forceinline__ float f16_at(const uint8_t* p) { return __half2float(*(const __half*)p); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// f32 values taken to f16 for a tensor-core or half-precision product: scaling by 2^-e, e = f16_scale_exp(amax),
// brings the largest magnitude amax into [2^14, 2^15) (no overflow, small rows keep their 11 bits; exact to undo),
// and split_f16 keeps a value as an f16 high part and the f16 rounding of the rest (about 22 bits together).
// e is at least -126 (amax below 2^-112 keeps fewer bits), so that pow2f(e) and pow2f(-e) are normal floats.
__device__ __forceinline__ int f16_scale_exp(float amax) {
    return amax > 0.0f ? max(((__float_as_int(amax) >> 23) & 255) - 127 - 14, -126) : 0;
}
// 2^e for -126 <= e <= 127, exactly (ldexpf's range checks cost ~100 instructions).
__device__ __forceinline__ float pow2f(int e) { return __int_as_float((127 + e) << 23); }
__device__ __forceinline__ void split_f16(float v, __half& hi, __half& lo) {
    hi = __float2half_rn(v);
    lo = __float2half_rn(v - __half2float(hi));
}

}  // namespace ds4::cuda
