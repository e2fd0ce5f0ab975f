// What one kernel boundary costs a decode step's chain: launches of small kernels back to back in a CUDA graph, each
// a programmatic dependent of the one before (griddepcontrol.wait before its work, launch_dependents at its start,
// as every ds4d kernel does). A standalone probe, no ds4d:
//
//     nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/link bench/cuda_link.cu && /tmp/link
//
// Each figure is the time per launch (best of 5 replays of a graph of 40, cuda_probe.cuh). The shapes:
//   empty     16 blocks of 512 threads that only wait
//   load      the same, each thread then reading 16 bytes its predecessor wrote (one trip to L2 after the wait)
//   store     empty, each thread then writing 20 bytes (hc_pre's outputs: x and the new streams)
//   load+st   load, then store what it read plus one (the chain of a small kernel: read, compute, write)
//   cluster   load+st in thread block clusters of 16 with two cluster barriers between the load and the store
//   wide      264 blocks of 256 threads with 100 KB of shared memory each (a product's footprint: two per SM), load+st
//   wide/16   wide and load+st alternating (a product, then a small kernel)
// each with and without programmatic dependent launch (PDL off: plain stream order).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "cuda_probe.cuh"

enum Shape { kEmpty, kLoad, kStore, kLoadStore, kCluster, kWide };

// in, out: float4 per thread of the grid (the buffers alternate, so each launch reads what the one before wrote).
template <Shape S>
__global__ void link_kernel(const float4* in, float4* out) {
    extern __shared__ float4 pad[];  // kWide: the footprint only
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if constexpr (S == kEmpty) return;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    float4 v = make_float4(1.f, 2.f, 3.f, 4.f);
    if constexpr (S != kStore) v = in[i];
    if constexpr (S == kCluster) {
        cooperative_groups::this_cluster().sync();
        cooperative_groups::this_cluster().sync();
    }
    if constexpr (S == kWide) {
        if (v.x == -1.0f) pad[threadIdx.x] = v;  // never: keeps the shared memory
    }
    if constexpr (S == kLoad) {
        if (v.x == -1.0f) out[i] = v;  // never
        return;
    }
    out[i] = make_float4(v.x + 1.f, v.y, v.z, v.w);
    if constexpr (S == kStore) reinterpret_cast<float*>(out + gridDim.x * blockDim.x)[i] = v.x;
}

struct Launch {
    void (*kernel)(const float4*, float4*);
    int blocks, threads, cluster;
    size_t smem;
};

static void enqueue(const Launch& l, cudaStream_t s, bool pdl, const float4* in, float4* out) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(l.blocks);
    cfg.blockDim = dim3(l.threads);
    cfg.dynamicSmemBytes = l.smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[2];
    int n = 0;
    if (pdl) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (l.cluster > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n++].val.clusterDim = {(unsigned)l.cluster, 1, 1};
    }
    cfg.attrs = attr;
    cfg.numAttrs = n;
    CK(cudaLaunchKernelEx(&cfg, l.kernel, in, out));
}

int main() {
    const size_t n4 = 2 * 264 * 512;  // float4 per buffer: the widest grid, and the store shape's second output
    float4 *a, *b;
    CK(cudaMalloc(&a, n4 * sizeof(float4)));
    CK(cudaMalloc(&b, n4 * sizeof(float4)));
    CK(cudaMemset(a, 0, n4 * sizeof(float4)));
    CK(cudaMemset(b, 0, n4 * sizeof(float4)));
    const size_t wide_smem = 100 * 1024;
    CK(cudaFuncSetAttribute(link_kernel<kWide>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wide_smem));
    CK(cudaFuncSetAttribute(link_kernel<kCluster>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const Launch empty{link_kernel<kEmpty>, 16, 512, 1, 0}, load{link_kernel<kLoad>, 16, 512, 1, 0},
        store{link_kernel<kStore>, 16, 512, 1, 0}, ldst{link_kernel<kLoadStore>, 16, 512, 1, 0},
        cluster{link_kernel<kCluster>, 16, 512, 16, 0}, wide{link_kernel<kWide>, 264, 256, 1, wide_smem};
    const Launch alt[2] = {wide, ldst};
    struct Row {
        const char* name;
        const Launch* seq;
        int len;
    } rows[] = {{"empty", &empty, 1}, {"load", &load, 1},       {"store", &store, 1}, {"load+st", &ldst, 1},
                {"cluster", &cluster, 1}, {"wide", &wide, 1}, {"wide/16", alt, 2}};
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    std::printf("%s: us per launch in a graph of 40\n\n| shape | PDL | no PDL |\n|---|---:|---:|\n", p.name);
    for (const Row& r : rows) {
        float us[2];
        for (int off = 0; off < 2; ++off) {  // PDL on, then off; each launch reads what the one before wrote
            auto run = [&](cudaStream_t s, int i) { enqueue(r.seq[i % r.len], s, off == 0, i ? b : a, i ? a : b); };
            us[off] = per_launch_us(run, 2, 40);
        }
        std::printf("| %s | %.2f | %.2f |\n", r.name, us[0], us[1]);
    }
    return 0;
}
