// Decode attention: one query token per session against its raw window and (selected) compressed rows, 64 heads
// sharing one K = V row per position (MODEL.md 3.4 step 8), with a per-head sink in the softmax denominator.
//
// Split rows ("flash decoding") in two launches. The first gives each block 32 consecutive rows of one token's
// row list (raw rows first, then compressed rows in list order) and 4 heads: it stages the f16 rows and the 4
// query vectors in shared memory, each warp scores one head (lane i: row i), takes the split's max and sum of
// exponentials, and accumulates its p-weighted rows (lane i: dims 16 i .. 16 i + 15 at dim 512) into a partial
// result in scratch. The second combines the splits of each (token, head) with the sink (a combine folded into the
// last block of each split group measured slower: its serial tail outweighed the saved launch). Row counts come
// from device memory: the grid covers the capacity, and blocks past a token's rows do nothing. Each token's rows
// live at a fixed stride from one base, or where its entry of a per-token table of row arrays says (the sessions
// of a batch have separate buffers; a prefill token's window is a range of a staging array). f32 arithmetic
// throughout (f16 rows convert exactly).
#include "common.cuh"

namespace ds4::cuda {
namespace {

constexpr int kRows = 32;       // rows per split
constexpr int kHeads = 4;       // heads per block (one per warp): more blocks in flight than with 8

struct AttnArgs {
    float* out;
    float* part;  // (n_tok, n_head, n_split, dim + 4): m, l, 2 pad, o[dim]
    const float* q;
    const uint8_t* raw;
    int64_t raw_stride;                // elements
    const uint8_t* const* raw_rows;    // per-token row arrays (null: raw + t * raw_stride)
    const int32_t* raw_n;
    int raw_cap;
    const uint8_t* comp;
    int64_t comp_stride;
    const uint8_t* const* comp_rows;   // likewise for the compressed rows
    const int32_t* comp_n;
    int comp_cap;
    const int32_t* sel;
    int sel_cap;
    const float* sinks;
    int n_head, dim, n_split;
    float scale;
};

// Rows of token t: raw rows, then compressed candidates (the selection list's entries, or every row).
__device__ __forceinline__ int row_count(const AttnArgs& a, int t, int& n_raw) {
    n_raw = min(max(a.raw_n[t], 0), a.raw_cap);
    const int n_comp = a.sel ? a.sel_cap : min(max(a.comp_n[t], 0), a.comp_cap);
    return n_raw + n_comp;
}

// Eight consecutive values i*8 .. i*8+7 of a staged row of R (f16 or f32) as floats.
template <typename R>
__device__ __forceinline__ void row8(const uint8_t* kr, int i, float (&k)[8]) {
    if constexpr (sizeof(R) == 2) {
        const uint4 raw = *(const uint4*)(kr + 16 * i);
        const float2 k0 = __half22float2(*(const __half2*)&raw.x), k1 = __half22float2(*(const __half2*)&raw.y);
        const float2 k2 = __half22float2(*(const __half2*)&raw.z), k3 = __half22float2(*(const __half2*)&raw.w);
        k[0] = k0.x, k[1] = k0.y, k[2] = k1.x, k[3] = k1.y, k[4] = k2.x, k[5] = k2.y, k[6] = k3.x, k[7] = k3.y;
    } else {
        const float4 a = *(const float4*)(kr + 32 * i), b = *(const float4*)(kr + 32 * i + 16);
        k[0] = a.x, k[1] = a.y, k[2] = a.z, k[3] = a.w, k[4] = b.x, k[5] = b.y, k[6] = b.z, k[7] = b.w;
    }
}

// R: the row type, f16 (faithful numerics) or f32 (exact numerics keep the CPU's f32 rows).
template <int DL, typename R>
__global__ void __launch_bounds__(32 * kHeads, 4) attention_split_kernel(AttnArgs a) {
    constexpr int D = 32 * DL;
    constexpr int kRowBytes = (int)sizeof(R) * D + 16;  // padded: lanes reading a column of consecutive rows
    extern __shared__ __align__(16) uint8_t smem[];
    uint8_t* krows = smem;
    float* qs = (float*)(smem + kRows * kRowBytes);
    float* ps = qs + kHeads * D;
    int* valid = (int*)(ps + kHeads * kRows);
    pdl_trigger();
    pdl_wait();

    const int t = blockIdx.z, h0 = blockIdx.y * kHeads, v0 = blockIdx.x * kRows;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n_raw;
    const int total = row_count(a, t, n_raw);
    if (v0 >= total) return;

    // Each of the split's rows: where it lives (raw window, or the compressed row its list entry names), or null.
    __shared__ const uint8_t* src_row[kRows];
    if (threadIdx.x < kRows) {
        const int v = v0 + threadIdx.x;
        const uint8_t* src = nullptr;
        constexpr int64_t kRow = (int64_t)sizeof(R) * D;
        if (v < n_raw) {
            src = (a.raw_rows ? a.raw_rows[t] : a.raw + (int64_t)t * a.raw_stride * (int64_t)sizeof(R)) + v * kRow;
        } else if (v < total) {
            const int c = a.sel ? a.sel[(int64_t)t * a.sel_cap + (v - n_raw)] : v - n_raw;
            if (c >= 0 && c < min(a.comp_n[t], a.comp_cap))
                src = (a.comp_rows ? a.comp_rows[t] : a.comp + (int64_t)t * a.comp_stride * (int64_t)sizeof(R)) +
                      c * kRow;
        }
        src_row[threadIdx.x] = src;
        valid[threadIdx.x] = src != nullptr;
    }
    __syncthreads();
    // Stage the rows (16-byte pieces) and the block's query vectors.
    constexpr int kPieces = (int)sizeof(R) * D / 16;
    for (int i = threadIdx.x; i < kRows * kPieces; i += blockDim.x) {
        const int r = i / kPieces, pc = i - r * kPieces;
        if (src_row[r]) cp_async16(krows + r * kRowBytes + 16 * pc, src_row[r] + 16 * pc);
    }
    for (int i = threadIdx.x; i < kHeads * D / 4; i += blockDim.x) {
        const int hh = i / (D / 4), pc = i - hh * (D / 4);
        if (h0 + hh < a.n_head) cp_async16(qs + hh * D + 4 * pc, a.q + ((int64_t)t * a.n_head + h0 + hh) * D + 4 * pc);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int h = h0 + warp;
    const bool live = h < a.n_head;
    // Scores: lane = row.
    float s = -INFINITY;
    if (live && valid[lane]) {
        const uint8_t* kr = krows + lane * kRowBytes;
        const float* qh = qs + warp * D;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;  // four chains: the FMA latency is not the limit
#pragma unroll 8
        for (int pc = 0; pc < D / 8; ++pc) {
            float k[8];
            row8<R>(kr, pc, k);
            const float4 qa = *(const float4*)(qh + 8 * pc), qb = *(const float4*)(qh + 8 * pc + 4);
            s0 = fmaf(qa.x, k[0], s0), s1 = fmaf(qa.y, k[1], s1);
            s2 = fmaf(qa.z, k[2], s2), s3 = fmaf(qa.w, k[3], s3);
            s0 = fmaf(qb.x, k[4], s0), s1 = fmaf(qb.y, k[5], s1);
            s2 = fmaf(qb.z, k[6], s2), s3 = fmaf(qb.w, k[7], s3);
        }
        s = ((s0 + s1) + (s2 + s3)) * a.scale;
    }
    const float m = warp_max(s);
    const float p = s == -INFINITY ? 0.0f : expf(s - m);
    const float l = warp_sum(p);
    ps[warp * kRows + lane] = p;
    __syncwarp();

    // Weighted rows: lane = DL consecutive dims.
    float o[DL];
#pragma unroll
    for (int i = 0; i < DL; ++i) o[i] = 0.0f;
    for (int r = 0; r < kRows; ++r) {
        const float pr = ps[warp * kRows + r];
        if (pr == 0.0f) continue;  // also skips rows never staged
        const uint8_t* kr = krows + r * kRowBytes + (int)sizeof(R) * DL * lane;
        if constexpr (sizeof(R) == 4) {
#pragma unroll
            for (int i = 0; i < DL; i += 4) {
                const float4 f = *(const float4*)(kr + 4 * i);
                o[i] = fmaf(pr, f.x, o[i]), o[i + 1] = fmaf(pr, f.y, o[i + 1]);
                o[i + 2] = fmaf(pr, f.z, o[i + 2]), o[i + 3] = fmaf(pr, f.w, o[i + 3]);
            }
            continue;
        }
        uint32_t w[DL / 2];
        if constexpr (DL == 4) {
            const uint2 raw = *(const uint2*)kr;
            w[0] = raw.x, w[1] = raw.y;
        } else {
#pragma unroll
            for (int i = 0; i < DL / 8; ++i) {
                const uint4 raw = *(const uint4*)(kr + 16 * i);
                w[4 * i] = raw.x, w[4 * i + 1] = raw.y, w[4 * i + 2] = raw.z, w[4 * i + 3] = raw.w;
            }
        }
#pragma unroll
        for (int k = 0; k < DL / 2; ++k) {
            const float2 f = __half22float2(*(const __half2*)&w[k]);
            o[2 * k] = fmaf(pr, f.x, o[2 * k]);
            o[2 * k + 1] = fmaf(pr, f.y, o[2 * k + 1]);
        }
    }
    if (!live) return;
    float* part = a.part + (((int64_t)t * a.n_head + h) * a.n_split + blockIdx.x) * (D + 4);
    if (lane == 0) part[0] = m, part[1] = l;
#pragma unroll
    for (int i = 0; i < DL; i += 4)
        *(float4*)(part + 4 + DL * lane + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
}

// One block per (head, token): M = max(sink, split maxima); out = sum_s e^(m_s - M) o_s / (e^(sink - M) +
// sum_s e^(m_s - M) l_s). The splits' (m, l) are read once into shared memory (all in flight together), and each
// thread's o pieces are loaded kCombineBatch splits at a time before they are summed. A token with no row at all
// gets 0 (only the sink).
constexpr int kCombineBatch = 8;

__global__ void attention_combine_kernel(AttnArgs a) {
    extern __shared__ float sw[];  // per split: weight e^(m_s - M) (0 for a split with no valid row), then l_s
    __shared__ float inv_den;
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x, t = blockIdx.y, stride = a.dim + 4;
    int n_raw;
    const int n_split = (int)ceil_div(row_count(a, t, n_raw), kRows);
    const float* part = a.part + ((int64_t)t * a.n_head + h) * a.n_split * stride;
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) {
        sw[s] = part[s * stride];
        sw[n_split + s] = part[s * stride + 1];
    }
    __syncthreads();
    const float sink = a.sinks[h];
    float M = sink;
    for (int s = 0; s < n_split; ++s) M = fmaxf(M, sw[s]);
    __syncthreads();
    for (int s = threadIdx.x; s < n_split; s += blockDim.x) sw[s] = sw[s] == -INFINITY ? 0.0f : expf(sw[s] - M);
    __syncthreads();
    if (threadIdx.x == 0) {
        float den = expf(sink - M);
        for (int s = 0; s < n_split; ++s) den += sw[s] * sw[n_split + s];
        inv_den = 1.0f / den;
    }
    __syncthreads();
    for (int d = 4 * threadIdx.x; d < a.dim; d += 4 * blockDim.x) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s0 = 0; s0 < n_split; s0 += kCombineBatch) {
            float4 o[kCombineBatch];
#pragma unroll
            for (int k = 0; k < kCombineBatch; ++k)
                if (s0 + k < n_split && sw[s0 + k] != 0.0f) o[k] = *(const float4*)(part + (s0 + k) * stride + 4 + d);
#pragma unroll
            for (int k = 0; k < kCombineBatch; ++k) {
                if (s0 + k >= n_split) break;
                const float w = sw[s0 + k];
                if (w == 0.0f) continue;
                acc.x = fmaf(w, o[k].x, acc.x), acc.y = fmaf(w, o[k].y, acc.y);
                acc.z = fmaf(w, o[k].z, acc.z), acc.w = fmaf(w, o[k].w, acc.w);
            }
        }
        *(float4*)(a.out + ((int64_t)t * a.n_head + h) * a.dim + d) =
            make_float4(acc.x * inv_den, acc.y * inv_den, acc.z * inv_den, acc.w * inv_den);
    }
}

int splits(int raw_cap, int comp_cap, int sel_cap, bool has_sel) {
    return (int)ceil_div((int64_t)raw_cap + (has_sel ? sel_cap : comp_cap), kRows);
}

template <int DL, typename R>
cudaError_t attention_launch(cudaStream_t s, const AttnArgs& a, int n_tok) {
    constexpr int D = 32 * DL;
    const size_t smem = kRows * (sizeof(R) * D + 16) + kHeads * D * 4 + kHeads * kRows * 4 + kRows * 4;
    cudaError_t e = allow_smem(attention_split_kernel<DL, R>, smem);
    if (e != cudaSuccess) return e;
    e = launch(attention_split_kernel<DL, R>, dim3(a.n_split, (unsigned)ceil_div(a.n_head, kHeads), n_tok),
               dim3(32 * kHeads), smem, s, a);
    if (e != cudaSuccess) return e;
    return launch(attention_combine_kernel, dim3(a.n_head, n_tok), dim3(128), 2 * a.n_split * sizeof(float), s, a);
}


}  // namespace
}  // namespace ds4::cuda

using namespace ds4::cuda;

size_t ds4_cuda_attention_scratch_bytes(int n_tok, int n_head, int dim, int raw_cap, int comp_cap, int sel_cap,
                                        bool has_sel) {
    return (size_t)n_tok * n_head * std::max(1, splits(raw_cap, comp_cap, sel_cap, has_sel)) * (dim + 4) *
           sizeof(float);
}

cudaError_t ds4_cuda_attention_decode(cudaStream_t s, float* out, void* scratch, const float* q, const void* raw,
                                      int64_t raw_stride, const int32_t* raw_n, int raw_cap, const void* comp,
                                      int64_t comp_stride, const int32_t* comp_n, int comp_cap, const int32_t* sel,
                                      int sel_cap, const float* sinks, int n_tok, int n_head, int dim, float scale,
                                      const void* const* raw_rows, const void* const* comp_rows, bool f32_rows) {
    clear_error();
    if (dim != 128 && dim != 256 && dim != 512) return invalid("attention: dim must be 128, 256 or 512");
    if (n_tok < 1 || n_tok > 65535 || n_head < 1 || n_head > 65535 * kHeads || raw_cap < 0 || comp_cap < 0 ||
        (sel && sel_cap < 1) || !raw_n || !comp_n || !sinks)
        return invalid("attention: bad counts (n_tok, n_head, capacities) or missing raw_n / comp_n / sinks");
    if ((uintptr_t)raw % 16 || (uintptr_t)comp % 16 || (uintptr_t)q % 16 || (uintptr_t)out % 16 ||
        (uintptr_t)scratch % 16 || raw_stride % 8 || comp_stride % 8)
        return invalid("attention: q, out, scratch and the row stores must be 16-byte aligned");
    const int n_split = std::max(1, splits(raw_cap, comp_cap, sel_cap, sel != nullptr));
    AttnArgs a{out,       (float*)scratch, q,    (const uint8_t*)raw, raw_stride, (const uint8_t* const*)raw_rows,
               raw_n,     raw_cap,         (const uint8_t*)comp,     comp_stride, (const uint8_t* const*)comp_rows,
               comp_n,    comp_cap,        sel,  sel_cap,             sinks,      n_head,
               dim,       n_split,         scale};
    if (a.n_split > 65535) return invalid("attention: too many rows");
    switch (dim * (f32_rows ? -1 : 1)) {
        case 128: return attention_launch<4, __half>(s, a, n_tok);
        case 256: return attention_launch<8, __half>(s, a, n_tok);
        case 512: return attention_launch<16, __half>(s, a, n_tok);
        case -128: return attention_launch<4, float>(s, a, n_tok);
        case -256: return attention_launch<8, float>(s, a, n_tok);
        default: return attention_launch<16, float>(s, a, n_tok);
    }
}
