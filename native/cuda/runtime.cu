// Runtime pieces of the CUDA backend: per-device setup (the IQ2_XXS decode tables in device memory), device
// properties, the dependent-launch switch, argument-error messages, and random weight blocks for benchmarks.
#include <mutex>
#include <vector>

#include "common.cuh"
#include "iq2xxs_tables.h"
#include "qdot.cuh"

namespace ds4::cuda {

namespace {

thread_local std::string g_error;
bool g_pdl_on = true;

constexpr int kMaxDevices = 64;
DeviceProps g_props[kMaxDevices];
uint32_t* g_tables[kMaxDevices];
std::once_flag g_once[kMaxDevices];

int current_device() {
    int dev = 0;
    cudaGetDevice(&dev);
    return dev < kMaxDevices ? dev : 0;
}

void read_props(int dev) {
    DeviceProps& p = g_props[dev];
    cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, dev);
    int major = 0, minor = 0, optin = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    p.cc = major * 10 + minor;
    p.smem_optin = (size_t)optin;
}

}  // namespace

cudaError_t invalid(const std::string& why) {
    g_error = why;
    return cudaErrorInvalidValue;
}
void clear_error() { g_error.clear(); }

const DeviceProps& props() {
    const int dev = current_device();
    std::call_once(g_once[dev], read_props, dev);
    return g_props[dev];
}

bool pdl_enabled() { return g_pdl_on && props().cc >= 90; }

const uint32_t* iq2_tables() { return g_tables[current_device()]; }

// ---- random blocks ---------------------------------------------------------------------------------------------

namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// A random f16 of magnitude 2^-14 .. 2^-8 (exponent field 1..7 times a mantissa) and random sign.
__device__ __forceinline__ uint16_t random_scale(uint64_t r) {
    const uint16_t exp = (uint16_t)(1 + (r >> 10) % 7);
    return (uint16_t)((r & 0x3ff) | (exp << 10) | ((r >> 20) & 1) << 15);
}

// One thread per 16-byte chunk of random bytes, then one thread per block fixes its scale fields.
__global__ void fill_bytes_kernel(uint4* dst, size_t n16, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        const uint64_t a = mix64(seed + 2 * i), b = mix64(seed + 2 * i + 1);
        dst[i] = make_uint4((uint32_t)a, (uint32_t)(a >> 32), (uint32_t)b, (uint32_t)(b >> 32));
    }
}

__global__ void fill_tail_kernel(uint8_t* dst, size_t n, uint64_t seed) {
    if (threadIdx.x < n) dst[threadIdx.x] = (uint8_t)mix64(seed - 1 - threadIdx.x);
}

__global__ void fill_scales_kernel(uint8_t* dst, size_t n_blocks, int block_bytes, int off0, int off1, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n_blocks; i += (size_t)gridDim.x * blockDim.x) {
        const uint64_t r = mix64(seed ^ (0x9e3779b97f4a7c15ull * (i + 1)));
        uint8_t* b = dst + i * block_bytes;
        const uint16_t s0 = random_scale(r), s1 = random_scale(r >> 32);
        b[off0] = (uint8_t)s0, b[off0 + 1] = (uint8_t)(s0 >> 8);
        if (off1 >= 0) b[off1] = (uint8_t)s1, b[off1 + 1] = (uint8_t)(s1 >> 8);
    }
}

// Float types: uniform values in about [-1, 1).
__global__ void fill_floats_kernel(uint8_t* dst, size_t n, int type, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = (float)(int32_t)(uint32_t)mix64(seed + i) * (1.0f / 2147483648.0f);
        if (type == TYPE_F32) ((float*)dst)[i] = v;
        else if (type == TYPE_F16) ((__half*)dst)[i] = __float2half_rn(v);
        else ((__nv_bfloat16*)dst)[i] = __float2bfloat16_rn(v);
    }
}

}  // namespace

}  // namespace ds4::cuda

using namespace ds4;
using namespace ds4::cuda;

const char* ds4_cuda_error_message() { return g_error.c_str(); }

void ds4_cuda_set_pdl(bool on) { g_pdl_on = on; }
bool ds4_cuda_pdl() { return pdl_enabled(); }

cudaError_t ds4_cuda_init() {
    clear_error();
    const int dev = current_device();
    props();
    if (g_tables[dev]) return cudaSuccess;
    // The byte-permute selectors of qdot.cuh: per grid point, the 2-bit code (8 -> 0, 25 -> 1, 43 -> 2) of each of
    // its 8 magnitudes in its own nibble (weights 0-3 in the low 16 bits, 4-7 in the high); per 7-bit sign index,
    // 3 in the nibble of each negative weight (bit 7 of the sign byte makes the count of minus signs even).
    std::vector<uint32_t> host(kIq2TableWords, 0);
    auto nibble = [](int k) { return k < 4 ? 4 * k : 16 + 4 * (k - 4); };
    for (int i = 0; i < 256; ++i)
        for (int k = 0; k < 8; ++k) {
            const int mag = (int)(kIq2xxsGrid[i] >> (8 * k) & 0xff);
            host[i] |= (uint32_t)(mag == 8 ? 0 : mag == 25 ? 1 : 2) << nibble(k);
        }
    for (int i = 0; i < 128; ++i)
        for (int k = 0; k < 8; ++k)
            if (kIq2xxsSigns[i] >> k & 1) host[256 + i] |= 3u << nibble(k);
    host[kIq2LoWord] = kIq2Lo;
    uint32_t* d = nullptr;
    cudaError_t e = cudaMalloc(&d, kIq2TableWords * sizeof(uint32_t));
    if (e != cudaSuccess) return e;
    e = cudaMemcpy(d, host.data(), kIq2TableWords * sizeof(uint32_t), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return e;
    g_tables[dev] = d;
    return cudaSuccess;
}

cudaError_t ds4_cuda_fill_random(cudaStream_t s, void* dst, size_t bytes, int type, uint64_t seed) {
    clear_error();
    const int bb = block_bytes(type);
    if (bb == 0) return invalid("fill_random: unsupported type " + std::to_string(type));
    if (bytes % bb != 0 || (uintptr_t)dst % 16 != 0)
        return invalid("fill_random: a 16-byte aligned whole number of blocks is needed");
    const int grid = 4 * props().sms, threads = 256;
    if (type == TYPE_F32 || type == TYPE_F16 || type == TYPE_BF16) {
        fill_floats_kernel<<<grid, threads, 0, s>>>((uint8_t*)dst, bytes / bb, type, seed);
        return cudaGetLastError();
    }
    fill_bytes_kernel<<<grid, threads, 0, s>>>((uint4*)dst, bytes / 16, seed);
    if (bytes % 16) fill_tail_kernel<<<1, 32, 0, s>>>((uint8_t*)dst + bytes / 16 * 16, bytes % 16, seed);
    int off0 = 0, off1 = -1;
    switch (type) {
        case TYPE_Q2_K: off0 = 80, off1 = 82; break;
        case TYPE_Q4_K: off0 = 0, off1 = 2; break;
        default: break;  // Q8_0, IQ2_XXS: d at byte 0
    }
    fill_scales_kernel<<<grid, threads, 0, s>>>((uint8_t*)dst, bytes / bb, bb, off0, off1, seed);
    return cudaGetLastError();
}
