// How fast can a kernel read N bytes of HBM on this card, and what does the matrix-vector kernels' way of reading
// (rows of Q8_0 weights in 2,176-byte stages, qdot.cuh) cost against a plain stream? A standalone probe, no ds4d:
//
//     nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/stream_bw bench/cuda_stream_bw.cu && /tmp/stream_bw
//
// Each figure is one launch's time in a CUDA graph of back-to-back launches (best of 5 replays) that rotate over
// buffers totaling at least 5x the L2, at 34 MB (one attn_q_b / out_a / out_b product), 136 MB and 512 MB (about an
// LM head). The readers only fold what they read into a value they never store, so nothing is written.
//   ldg       16-byte loads, 8 in flight per thread, 8 blocks of 256 threads per SM, each block a contiguous range
//   cp.async  per-warp rings of 3 stages of 2 KB (the Streamer's mechanism), warps on contiguous ranges
//   rows      the same rings over rows of RB bytes in RB / SB stages, warps taking rows w, w + warps, ... as the
//             matvec does (4,352-byte rows: Q8_0 rows of 4,096 weights); + decode: a Q8_0-like funnel shift and
//             8 dp4a per 34-byte unit on every staged byte
//   tma       cp.async.bulk stages of 8 KB into a 4-deep ring per block, one thread issuing, mbarriers
//   memcpy    cudaMemcpyAsync device to device (read + write bytes: the figure the floors in PERFORMANCE.md use)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda_probe.cuh"

constexpr uint32_t kNever = 0x9e3779b9u;  // what the folded value never equals (keeps the reads)

__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__global__ void __launch_bounds__(256) ldg_kernel(const uint4* p, size_t n16, uint32_t* out) {
    constexpr int U = 8;
    const size_t per = (n16 + gridDim.x - 1) / gridDim.x, b0 = blockIdx.x * per, b1 = min(n16, b0 + per);
    uint32_t acc = 0;
    size_t i = b0 + threadIdx.x;
    for (; i + (U - 1) * 256 < b1; i += U * 256) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = ldg_stream(p + i + u * 256);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < b1; i += 256) {
        const uint4 v = ldg_stream(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == kNever) out[0] = acc;
}

__device__ __forceinline__ void cp16(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// Per-warp rings of D stages. Stage s of a warp reads SB bytes at src(s); ROWS: rows of RB bytes in RB / SB
// stages, warp w taking rows w, w + warps, ...; else contiguous ranges of whole stages (RB unused). DECODE: a
// Q8_0-like unit decode (funnel shifts, 8 dp4a) of every 34 staged bytes instead of folding them.
template <int SB, int RB, bool ROWS, bool DECODE>
__global__ void __launch_bounds__(256) ring_kernel(const uint8_t* p, size_t n, uint32_t* out) {
    constexpr int D = 3, NS = ROWS ? RB / SB : 1, SLOT = (SB + 32 + 15) / 16 * 16;
    extern __shared__ __align__(16) uint8_t sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t gw = (size_t)gridDim.x * 8, w = (size_t)blockIdx.x * 8 + warp;
    size_t total, first = 0;
    if constexpr (ROWS) {
        const size_t rows = n / RB;
        total = NS * (w < rows ? (rows - 1 - w) / gw + 1 : 0);
    } else {
        const size_t nst = n / SB, per = (nst + gw - 1) / gw;
        first = min(nst, w * per);
        total = min(nst, first + per) - first;
    }
    auto src = [&](size_t s) {
        return ROWS ? p + (w + s / NS * gw) * RB + s % NS * SB : p + (first + s) * SB;
    };
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(sm) + warp * D * SLOT;
    size_t issued = 0;
    auto issue = [&]() {
        if (issued < total) {
            const uint8_t* s = src(issued);
            const uint32_t d = ring + (uint32_t)(issued % D) * SLOT;
#pragma unroll
            for (int k = 0; k < (SB + 511) / 512; ++k)
                if (512 * k + 16 * lane < SB) cp16(d + 512 * k + 16 * lane, s + 512 * k + 16 * lane);
        }
        ++issued;
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    uint32_t acc = 0;
    for (int i = 0; i < D - 1; ++i) issue();
    for (size_t s = 0; s < total; ++s) {
        issue();
        asm volatile("cp.async.wait_group %0;" ::"n"(D - 1) : "memory");
        __syncwarp();
        const uint8_t* st = sm + (size_t)warp * D * SLOT + (s % D) * SLOT;
        if (DECODE) {
            for (int u = lane; 34 * u + 34 <= SB; u += 32) {
                const int off = 34 * u + 2, mis = off & 3;
                const uint32_t* wp = (const uint32_t*)(st + off - mis);
                uint32_t prev = wp[0];
                int dot = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const uint32_t next = wp[i + 1];
                    dot = __dp4a((int)__funnelshift_r(prev, next, 8 * mis), 0x01010101 * (i + 1), dot);
                    prev = next;
                }
                acc += (uint32_t)(dot * (int)st[34 * u]);
            }
        } else {
            for (int k = lane; k < SB / 16; k += 32) {
                const uint4 v = ((const uint4*)st)[k];
                acc ^= v.x ^ v.y ^ v.z ^ v.w;
            }
        }
        __syncwarp();
    }
    if (acc == kNever) out[0] = acc;
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
    asm volatile(
        "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n" ::"r"(bar),
        "r"(phase)
        : "memory");
}

__device__ __forceinline__ void bulk_stage(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

__global__ void __launch_bounds__(256) tma_kernel(const uint8_t* p, size_t n, uint32_t* out) {
    constexpr int SB = 8192, D = 4;
    extern __shared__ __align__(16) uint8_t sm[];
    __shared__ __align__(8) uint64_t bars[D];
    const size_t nst = n / SB, per = (nst + gridDim.x - 1) / gridDim.x, s0 = blockIdx.x * per;
    const size_t s1 = min(nst, s0 + per);
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(sm), bar = (uint32_t)__cvta_generic_to_shared(bars);
    if (threadIdx.x == 0) {
        for (int i = 0; i < D; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar + 8 * i));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 0; i < D && s0 + i < s1; ++i) bulk_stage(ring + i * SB, p + (s0 + i) * SB, SB, bar + 8 * i);
    uint32_t acc = 0;
    for (size_t s = s0; s < s1; ++s) {
        const int k = (int)((s - s0) % D);
        mbar_wait(bar + 8 * k, (uint32_t)((s - s0) / D) & 1);
        for (int i = threadIdx.x; i < SB / 16; i += 256) {
            const uint4 v = ((const uint4*)(sm + k * SB))[i];
            acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
        __syncthreads();
        if (threadIdx.x == 0 && s + D < s1) bulk_stage(ring + k * SB, p + (s + D) * SB, SB, bar + 8 * k);
    }
    if (acc == kNever) out[0] = acc;
}

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s, %d SMs\n", prop.name, sms);
    const size_t total = size_t(1600) << 20;
    uint8_t* base;
    uint32_t* out;
    CK(cudaMalloc(&base, total));
    CK(cudaMalloc(&out, 16));
    CK(cudaMemset(base, 1, total));
    for (size_t n : {size_t(34) << 20, size_t(136) << 20, size_t(512) << 20}) {
        const int n_buf = (int)std::min<size_t>(8, total / n), reps = n < (size_t(100) << 20) ? 32 : 8;
        auto buf = [&](int i) { return base + (size_t)i * n; };
        std::printf("\n%zu MB, %d buffers, %d launches per graph\n", n >> 20, n_buf, reps);
        auto report = [&](const char* name, float us) {
            std::printf("  %-34s %8.2f us %6.0f GB/s\n", name, us, n / us / 1e3);
        };
        report("ldg", per_launch_us([&](cudaStream_t s, int i) {
            ldg_kernel<<<sms * 8, 256, 0, s>>>((const uint4*)buf(i), n / 16, out);
        }, n_buf, reps));
        auto ring = [&](auto kernel, int sb, const char* name) {
            const int smem = 8 * 3 * ((sb + 32 + 15) / 16 * 16);
            CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            auto run = [&](cudaStream_t s, int i) { kernel<<<sms * 2, 256, smem, s>>>(buf(i), n, out); };
            report(name, per_launch_us(run, n_buf, reps));
        };
        ring(ring_kernel<2048, 2048, false, false>, 2048, "cp.async 2 KB stages");
        ring(ring_kernel<2048, 4096, true, false>, 2048, "rows 4096 B in 2 stages");
        ring(ring_kernel<2176, 4352, true, false>, 2176, "rows 4352 B in 2 stages");
        ring(ring_kernel<2176, 4352, true, true>, 2176, "rows 4352 B in 2 stages + decode");
        ring(ring_kernel<4352, 4352, true, false>, 4352, "rows 4352 B in 1 stage");
        CK(cudaFuncSetAttribute(tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * 8192));
        report("tma 8 KB stages", per_launch_us([&](cudaStream_t s, int i) {
            tma_kernel<<<sms * 2, 256, 4 * 8192, s>>>(buf(i), n, out);
        }, n_buf, reps));
        cudaEvent_t a, b;
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
        uint8_t* dst = base + total - n;
        CK(cudaMemcpy(dst, base, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(a));
        for (int r = 0; r < 5; ++r) CK(cudaMemcpyAsync(dst, buf(r % 2), n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        const float us = ms * 1000.0f / 5;
        std::printf("  %-34s %8.2f us %6.0f GB/s (read + write)\n", "memcpy", us, 2.0 * n / us / 1e3);
    }
    return 0;
}
