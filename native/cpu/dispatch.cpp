// Run-time choice of the kernels' ISA level and the thread count of ds4d._cpu.
//
// A level is available when it was built into the module (DS4_HAVE_*) and the CPU and OS support everything its
// translation units were compiled for: AVX2 needs AVX2, FMA, F16C and BMI2; AVX-512 additionally F, BW, DQ, VL
// and VNNI (a CPU with AVX-512 but no VNNI gets the AVX2 level). The best available level is chosen at import,
// unless DS4_CPU_ISA names one; the thread count comes from DS4_THREADS, else the hardware's.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <thread>

#include <unistd.h>

#include "ds4_cpu.h"
#include "kernels.h"
#include "pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace ds4::cpu {
namespace {

struct CpuLevels {
    bool avx2 = false, avx512 = false;
};

CpuLevels detect_cpu() {
    CpuLevels c;
#if defined(__x86_64__) || defined(_M_X64)
    unsigned a, b, cx, d;
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
    const bool fma = cx & (1u << 12), osxsave = cx & (1u << 27), avx = cx & (1u << 28), f16c = cx & (1u << 29);
    if (!(osxsave && avx)) return c;
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool os_ymm = (xcr0_lo & 0x6) == 0x6, os_zmm = (xcr0_lo & 0xe6) == 0xe6;  // + opmask, ZMM state
    if (!__get_cpuid_count(7, 0, &a, &b, &cx, &d)) return c;
    const bool avx2 = b & (1u << 5), bmi2 = b & (1u << 8);
    const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    const bool vnni = cx & (1u << 11);
    c.avx2 = os_ymm && avx2 && fma && f16c && bmi2;
    c.avx512 = c.avx2 && os_zmm && f && dq && bw && vl && vnni;
#endif
    return c;
}

struct Level {
    const char* name;
    const IsaKernels* kernels;
    bool available;
};

std::vector<Level> levels() {
    const CpuLevels cpu = detect_cpu();
    std::vector<Level> l{{"portable", &portable::kernels, true}};
#ifdef DS4_HAVE_AVX2
    l.push_back({"avx2", &avx2::kernels, cpu.avx2});
#endif
#ifdef DS4_HAVE_AVX512
    l.push_back({"avx512", &avx512::kernels, cpu.avx512});
#endif
    (void)cpu;
    return l;
}

const std::vector<Level>& all_levels() {
    static const std::vector<Level> l = levels();
    return l;
}

std::atomic<const IsaKernels*> g_kernels{&portable::kernels};
std::unique_ptr<ThreadPool> g_pool;
pid_t g_pool_pid = 0;  // the process whose threads g_pool owns

int default_threads() {
    if (const char* env = std::getenv("DS4_THREADS")) {
        char* end = nullptr;
        const long n = std::strtol(env, &end, 10);
        if (end == env || *end != '\0' || n < 1 || n > 4096)
            throw std::runtime_error(std::string("DS4_THREADS=") + env + " is not a thread count (1..4096)");
        return (int)n;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw ? (int)hw : 1;
}

}  // namespace

const IsaKernels& active_kernels() { return *g_kernels.load(std::memory_order_acquire); }

ThreadPool& pool() {
    // After fork() the child has none of the parent's workers (and their locks may be held for ever): it leaks
    // the parent's pool and starts its own, of the same size, on first use.
    if (g_pool_pid != getpid()) {
        const int n = g_pool->threads();
        (void)g_pool.release();
        g_pool = std::make_unique<ThreadPool>(n);
        g_pool_pid = getpid();
    }
    return *g_pool;
}

}  // namespace ds4::cpu

using namespace ds4::cpu;

void ds4_cpu_init() {
    const std::vector<std::string> avail = ds4_cpu_available_isas();
    std::string choice = avail.back();
    if (const char* env = std::getenv("DS4_CPU_ISA"); env && *env) {
        if (!ds4_cpu_set_isa(env)) {
            std::string list;
            for (const auto& a : avail) list += (list.empty() ? "" : ", ") + a;
            throw std::runtime_error(std::string("DS4_CPU_ISA=") + env +
                                     " is not available (built and supported by this CPU: " + list + ")");
        }
    } else {
        ds4_cpu_set_isa(choice);
    }
    g_pool = std::make_unique<ThreadPool>(default_threads());
    g_pool_pid = getpid();
}

std::vector<std::string> ds4_cpu_available_isas() {
    std::vector<std::string> names;
    for (const Level& l : all_levels())
        if (l.available) names.emplace_back(l.name);
    return names;
}

const char* ds4_cpu_isa() { return active_kernels().name; }

bool ds4_cpu_set_isa(const std::string& name) {
    for (const Level& l : all_levels())
        if (l.available && name == l.name) {
            g_kernels.store(l.kernels, std::memory_order_release);
            return true;
        }
    return false;
}

void ds4_cpu_set_threads(int n) { pool().resize(n); }

int ds4_cpu_threads() { return pool().threads(); }
