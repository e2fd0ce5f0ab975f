// Matrix-vector products for decode: y = W x for 1..16 activation rows, every weight type (ds4_cuda_matvec), and
// the standalone activation quantizer (ds4_cuda_quantize_act).
//
// A persistent grid of 8-warp blocks walks the rows: warp w of block b owns row sets (RPW consecutive rows: 1 for
// one token, 2 for more, so that each activation read serves two rows) slot, slot + n_slots, ... (in the largest
// products, slot per .. slot per + per - 1: kContigBytes). When there are
// too few rows to give every warp of one wave its own (kv: 512 rows, the router: 256), ks warps of a block
// share a row set and split its stages round-robin, and their partial sums meet in shared memory, added in
// slice order. Each block first issues its first weight stages (weights never depend on the previous kernel),
// then waits for the previous kernel, brings the activations it needs into shared memory, and streams
// (qdot.cuh); a warp reduces a set's RPW x NB sums in one shuffle tree (warp_sums). Float weights with 2+ tokens on
// sm_90 may instead split K over a cluster's blocks (launch_kc), each staging only its slice of the activations.
// Activations: for act8 types, one or two tokens are quantized by every block itself (16-32 KB of f32 per block);
// for more tokens a small kernel quantizes them once into the caller's workspace and every block copies the int8
// rows (4x fewer bytes than f32, and no repeated quantization). Float types keep f32 rows in
// shared memory when they fit in 64 KB; for 4+ tokens of wider rows, f16 rows scaled by a power of two per row
// (activations rounded to 11 bits: ~1e-4 relative on a product); else they read f32 rows from global memory.
// Q8_0 and F16 weights with 3+ tokens and a workspace take the tensor-core kernel below instead. matvec_normed:
// the act8 rows RMS-normed by whichever quantizes them (every block, or the workspace's small kernel), which also
// writes the normed rows out: the norm between two products (q_a's, before q_b) needs no launch of its own.
// matvec_quantizing: a Q8_0 product of 1-2 tokens whose grid has a few more blocks that quantize other rows (the
// routed experts' mid, for their down) beside it, a small launch's work off the chain. matvec_pair: two products of
// the same rows (a Q8_0 and an F16 one, 1-2 tokens) in one launch, its blocks shared by bytes, each half the same
// body.
#include "qdot.cuh"

namespace ds4::cuda {
namespace {

constexpr int kMaxParts = 8;

// Rows quantized to Q8_K (the K types' activations) by extra blocks of a product's launch, laid out as
// quantize_groups writes them: per group (one of the product's NB tokens: its rows) int8 values, a float per 256, the
// int16 sums per 16.
struct QuantJob {
    const float* x;  // NB x rows of cols values, dense
    uint8_t* work;   // NB blocks of act_bytes(rows, cols)
    int rows, blocks;
    int64_t cols;
};

struct MatvecArgs {
    float* y;
    int64_t y_stride;
    int n_parts;                  // > 0: rows cut into parts, part k (rows part_end[k - 1] .. part_end[k] - 1)
    int64_t part_end[kMaxParts];  // a dense (n_tok, rows of the part) array at part_y[k] (groups 1)
    float* part_y[kMaxParts];
    const uint8_t* w;
    int64_t rows, cols, row_bytes;
    const float* x;
    int64_t x_stride;
    int n_tok, ks;
    const uint32_t* tab;
    const uint8_t* xq;     // pre-quantized activations, act_bytes(n_tok, cols) per group, or null
    bool x_smem;           // float types: stage the f32 rows in shared memory
    bool x16;              // float types: stage the rows as f16 (scaled) in shared memory instead
    const float* norm_w;   // act8 types: the rows of x RMS-normed first (x * (1 / sqrt(mean(x^2) + eps)) * norm_w,
    float norm_eps;        // qdot.cuh's RowNorm) and written to xn (dense rows) when xn is not null (one group)
    float* xn;
    QuantJob job;          // matvec_kernel<T, NB, true>: job.blocks more blocks run it
    int blocks;            // matvec_pair_kernel: the blocks of the first product
    int kc = 1;            // > 1: K split over clusters of kc blocks (launch_kc)
    bool contig = false;   // warp slot x takes row sets x per .. x per + per - 1 (kContigBytes)
};

constexpr int64_t kXSmemMax = 64 * 1024;  // f32 activation rows kept in shared memory up to this size
// Products of at least this many bytes (DS4: the LM head alone) give each warp one contiguous range of row sets:
// the head at one token 147.7 -> 144.2 us on an H200 (3.8 -> 3.9 TB/s); every product so, 4 layers +5 us.
constexpr int64_t kContigBytes = 256ll << 20;
constexpr int kQuantizeAbove = 2;          // more tokens than this: quantize once into the workspace
constexpr int64_t kX16MinRows = 128;       // float weights: f16 activation rows only for this many rows or more

template <int NB>
constexpr int rows_per_warp() {
    return NB == 1 ? 1 : 2;
}

// The token slots (NB) of the kernel for 1-2 tokens: one token over rows of at most half a stage (q_b: 1024 Q8_0
// weights) takes two rows per warp and stage, as the two-token kernel does, so that each warp keeps twice the
// bytes in flight (H200: -1.5 us per layer).
template <int T>
int nb_of(int n_tok, int64_t cols) {
    return n_tok <= 1 && 2 * cols > Stage<T, WT<T>::sps>::weights ? 1 : 2;
}

template <int T>
__host__ __device__ size_t x_bytes(int n, int64_t cols, bool x_smem, bool x16) {
    return WT<T>::xb ? act_bytes<T>(n, cols) : x_smem ? (size_t)n * cols * 4 : x16 ? (size_t)n * cols * 2 : 0;
}

template <int T, int NB>
size_t matvec_smem(int64_t cols, bool x_smem, bool x16) {
    constexpr int RPW = rows_per_warp<NB>();
    return table_bytes<T>() + x_bytes<T>(NB, cols, x_smem, x16) + kWarps * RPW * NB * sizeof(float) +
           (size_t)kWarps * kDepth * RPW * Stage<T, WT<T>::sps>::slot;
}

// Where output (token t, row) goes: y's rows (group g's block of them), or the part that holds the row.
__device__ __forceinline__ float* out_at(const MatvecArgs& a, int g, int t, int64_t row) {
    if (a.n_parts == 0) return a.y + (int64_t)g * a.rows + t * a.y_stride + row;
    int k = 0;
    while (row >= a.part_end[k]) ++k;
    const int64_t first = k ? a.part_end[k - 1] : 0;
    return a.part_y[k] + t * (a.part_end[k] - first) + (row - first);
}

// The product's work in block `block` of the n_blocks that compute it (of group blockIdx.y): matvec_kernel's body,
// and either half of matvec_pair_kernel's grid.
template <int T, int NB, bool SPLIT = false>
__device__ __forceinline__ void matvec_blocks(const MatvecArgs& a, int block, int n_blocks) {
    constexpr int RPW = rows_per_warp<NB>(), SPS = WT<T>::sps, N = RPW * NB;  // N: a set's sums
    using G = Stage<T, SPS>;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float xscale[16];
    __shared__ float xinv[kNormRowsMax];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = blockIdx.y;
    // SPLIT: a cluster's kc blocks (a power of two) take the same row sets, block `rank` of them the columns
    // rank cols ... (rank + 1) cols - 1.
    const int kc = SPLIT ? a.kc : 1, lg = SPLIT ? __ffs(kc) - 1 : 0, rank = block & (kc - 1);
    block >>= lg;
    n_blocks >>= lg;
    const int64_t cols = a.cols >> lg;

    uint8_t* p = smem;
    uint32_t* tab = (uint32_t*)p;
    p += table_bytes<T>();
    uint8_t* xs = p;
    p += x_bytes<T>(NB, cols, a.x_smem, a.x16);
    float* red = (float*)p;
    p += kWarps * N * sizeof(float);
    uint8_t* ring = p + (size_t)warp * kDepth * RPW * G::slot;

    const int ks = a.ks, slice = warp % ks;
    const int slot = (block * kWarps + warp) / ks, n_slots = n_blocks * kWarps / ks;
    const int n_rowsets = (int)ceil_div(a.rows, RPW);
    const int per = (int)ceil_div(n_rowsets, n_slots);
    const int n_sets = a.contig ? max(0, min(per, n_rowsets - slot * per))
                     : slot < n_rowsets ? (n_rowsets - 1 - slot) / n_slots + 1 : 0;
    auto set_at = [&](int set) { return a.contig ? (int64_t)slot * per + set : slot + (int64_t)set * n_slots; };
    const int nchunks = (int)ceil_div(cols, G::weights);
    const int steps = slice < nchunks ? (nchunks - 1 - slice) / ks + 1 : 0;
    const int row_bytes = (int)a.row_bytes, slice_bytes = row_bytes >> lg, last_row = (int)a.rows - 1;
    const uint8_t* wg = a.w + (size_t)g * a.rows * a.row_bytes + rank * slice_bytes;

    auto plan = [&](int set, int st) {
        Src<RPW> s;
        const int row0 = (int)set_at(set) * RPW;
        const int c = slice + st * ks;
        s.k0 = c * G::weights;
        s.len = min(G::bytes, slice_bytes - c * G::bytes);
        s.live = RPW;
        s.seg = 0;
        const uint8_t* base = wg + c * G::bytes;
#pragma unroll
        for (int r = 0; r < RPW; ++r) s.p[r] = base + (size_t)min(row0 + r, last_row) * row_bytes;  // a short last
        return s;                                                                                 // set re-reads
    };
    auto stream = make_streamer<T, SPS, NB, RPW, true>(ring, lane, n_sets, steps, plan, l2_evict_first());
    stream.prologue();
    load_tables<T>(tab, a.tab);
    if (a.norm_w && !a.xq) prefetch_l1(a.norm_w, cols);
    pdl_wait();

    const float* xg = a.x + (int64_t)g * a.cols + rank * cols;  // this group's (block's) slice of every row
    XView xv{};
    if constexpr (WT<T>::xb != 0) {
        if (a.xq) {
            copy_act<T>(xs, a.xq + g * act_bytes<T>(a.n_tok, a.cols), a.n_tok, cols);  // kc is 1
            cp_async_wait<0>();
        } else if (a.norm_w) {  // every block norms the rows itself; block 0 writes them out
            row_norms(xinv, xg, a.x_stride, a.n_tok, cols, a.norm_eps, warp, kWarps);
            __syncthreads();
            const RowNorm nrm{xinv, a.norm_w, block == 0 ? a.xn : nullptr};
            quantize_block<T>(xs, xg, a.x_stride, a.n_tok, cols, &nrm);
        } else {
            quantize_block<T>(xs, xg, a.x_stride, a.n_tok, cols);
        }
        xv = act_view<T>(xs, a.n_tok, cols);
    } else if (a.x_smem) {
        const int64_t per = cols / 4;  // 16-byte pieces per row
        for (int64_t i = threadIdx.x; i < a.n_tok * per; i += blockDim.x) {
            const int64_t t = i / per, c = i - t * per;
            cp_async16(xs + 16 * i, xg + t * a.x_stride + 4 * c);
        }
        cp_async_commit();
        cp_async_wait<0>();
        xv.xf = (const float*)xs;
        xv.xf_tok = cols;
    } else if (a.x16) {
        // f16 rows, each scaled by 2^-e so that its largest value lands in [2^14, 2^15) (no overflow, and small
        // rows keep their 11 bits); the flush multiplies by 2^e again (exact).
        for (int t = warp; t < a.n_tok; t += kWarps) {
            const float* xr = xg + t * a.x_stride;
            float amax = 0.0f;
            for (int64_t k = 4 * lane; k < cols; k += 128) {
                const float4 v = *(const float4*)(xr + k);
                amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
            }
            amax = warp_max(amax);
            const int e = f16_scale_exp(amax);
            const float inv = pow2f(-e);
            if (lane == 0) xscale[t] = pow2f(e);
            __half2* dst = (__half2*)(xs + 2 * t * cols);
            for (int64_t k = 4 * lane; k < cols; k += 128) {
                const float4 v = *(const float4*)(xr + k);
                dst[k / 2] = __floats2half2_rn(v.x * inv, v.y * inv);
                dst[k / 2 + 1] = __floats2half2_rn(v.z * inv, v.w * inv);
            }
        }
        xv.xh = (const __half*)xs;
        xv.xf_tok = cols;
    } else {
        xv.xf = xg;
        xv.xf_tok = a.x_stride;
    }
    __syncthreads();

    auto xview = [&](int) { return &xv; };
    auto flush = [&](int set, float (&acc)[RPW][NB]) {
        const int64_t rs = set_at(set);
        // All N sums in one shuffle tree: lane i * (32 / N) gets sum i = r NB + t.
        float sums[N];
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int t = 0; t < NB; ++t) sums[r * NB + t] = acc[r][t];
        float v = warp_sums(sums);
        const int i = lane / (32 / N), r = i / NB, t = i % NB;
        const int64_t row = rs * RPW + r;
        if (lane % (32 / N) == 0 && t < a.n_tok) {
            if (a.x16) v *= xscale[t];
            if (ks > 1 || SPLIT) red[warp * N + i] = v;
            else if (row < a.rows) *out_at(a, g, t, row) = v;
        }
        if (ks > 1) {
            const int first = warp - slice;
            named_barrier(1 + warp / ks, 32 * ks);
            if (slice == 0 && lane < N) {
                const int64_t lrow = rs * RPW + lane / NB;
                if (lane % NB < a.n_tok && lrow < a.rows) {
                    float sum = 0.0f;
                    for (int s = 0; s < ks; ++s) sum += red[(first + s) * N + lane];
                    *out_at(a, g, lane % NB, lrow) = sum;
                }
            }
            named_barrier(1 + warp / ks, 32 * ks);  // partials read before the next set overwrites them
        }
    };
    stream.run(cols, a.n_tok, tab, xview, flush);
    if constexpr (SPLIT) {  // one set per warp (ks 1): block q of the cluster adds up the slices of warps w % kc == q
        cluster_sync();
        for (int i = threadIdx.x; i < kWarps * N; i += blockDim.x) {
            const int w = i / N, r = i % N / NB, t = i % NB;
            const int64_t row = ((int64_t)block * kWarps + w) * RPW + r;
            if (w % kc != rank || t >= a.n_tok || row >= a.rows) continue;
            float v = 0.0f;
            for (int q = 0; q < kc; ++q) v += cluster_at(red, q)[i];
            *out_at(a, g, t, row) = v;
        }
        cluster_sync();  // no block leaves while another reads its partial sums
    }
}

template <int T, int NB, bool JOB = false, bool SPLIT = false>
__global__ void __launch_bounds__(kThreads, 2) matvec_kernel(MatvecArgs a) {
    pdl_trigger();
    const int n_blocks = (int)gridDim.x - (JOB ? a.job.blocks : 0);  // the product's
    if constexpr (JOB) {
        const int jb = (int)blockIdx.x - n_blocks;
        if (jb >= 0) {  // a block of the job, beside the product's
            const QuantJob& q = a.job;
            const int64_t n = q.rows * q.cols;
            pdl_wait();
            for (int g = 0; g < NB; ++g) {
                uint8_t* b = q.work + g * act_bytes<TYPE_Q2_K>(q.rows, q.cols);  // any K type's: the Q8_K form
                quantize_rows<256>((int8_t*)b, (float*)(b + n), (int16_t*)(b + n + 4 * (n / 256)), q.x + g * n,
                                   q.cols, q.rows, q.cols, jb * kWarps + (threadIdx.x >> 5), q.blocks * kWarps);
            }
            return;
        }
    }
    matvec_blocks<T, NB, SPLIT>(a, blockIdx.x, n_blocks);
}

// Two products of the same activation rows in one launch (one group): the first a.blocks blocks compute a, the
// rest b, each half streaming its own rows as its own launch would (its NB, staging and ks, for its share of the
// resident blocks). DS4's q_a and kv (Q8_0) and the compressors' and indexer's products of the same input (F16):
// apart, the F16 launch on a side stream, its blocks filled the SMs beside q_a's, and q_b, next on the chain,
// could start only as they drained.
template <int T0, int NB0, int T1, int NB1>
__global__ void __launch_bounds__(kThreads, 2) matvec_pair_kernel(MatvecArgs a, MatvecArgs b) {
    pdl_trigger();
    if ((int)blockIdx.x < a.blocks) matvec_blocks<T0, NB0>(a, blockIdx.x, a.blocks);
    else matvec_blocks<T1, NB1>(b, blockIdx.x - a.blocks, gridDim.x - a.blocks);
}

// How a product of NB tokens stages float activations (act8 types quantize them): f32 rows in shared memory when
// they fit, else for four or more tokens f16 rows there (beat re-reading f32 rows from L1/L2 for every pair of
// weight rows: 5-10% of the bandwidth at 8 tokens of 4096, measured; few rows, the HC mixers' 24, re-read little
// and keep f32), else f32 rows read from global memory. Returns the product's shared memory.
template <int T, int NB>
size_t stage_x(MatvecArgs& a) {
    a.x_smem = WT<T>::xb == 0 && (int64_t)NB * a.cols * 4 <= kXSmemMax &&
               matvec_smem<T, NB>(a.cols, true, false) <= props().smem_optin;
    a.x16 = WT<T>::xb == 0 && !a.x_smem && NB >= 4 && a.rows >= kX16MinRows && (int64_t)NB * a.cols * 2 <= kXSmemMax &&
            matvec_smem<T, NB>(a.cols, false, true) <= props().smem_optin;
    return matvec_smem<T, NB>(a.cols, a.x_smem, a.x16);
}

// Warps per row set (ks) for `warps` resident warps: the smallest makespan over ks in {1, 2, 4, 8}, in stages per
// warp plus half a stage per set for its flush, so that rows divide evenly over the resident warps (4096 rows on
// 3168 warps would otherwise leave most warps idle for half of the time). Returns the blocks the product uses.
template <int T, int NB>
int64_t plan_ks(MatvecArgs& a, int64_t warps) {
    const int64_t sets = ceil_div(a.rows, rows_per_warp<NB>());
    const int nchunks = (int)ceil_div(a.cols, Stage<T, WT<T>::sps>::weights);
    double best = 1e300;
    for (int ks = 1; ks <= kWarps && ks <= nchunks; ks *= 2) {
        const int64_t units = sets * ks, used = std::min(units, warps);
        const double cost = (double)ceil_div(units, used) * ((double)ceil_div(nchunks, ks) + 0.5);
        if (cost < best - 1e-9) best = cost, a.ks = ks;
    }
    return ceil_div(std::min(sets * a.ks, warps), kWarps);
}

// The K split (matvec_kernel's SPLIT: float weights, 2+ tokens, sm_90): clusters of kc blocks take the same row
// sets, each a kc-th of the columns (whole stages), so that each block stages only its slice of the activations
// (f32 where the whole rows would need f16, or did not fit at all); the slices' sums meet in distributed shared
// memory, added in slice order. The router's product at 8 tokens: 9.1 -> 7.7 us (H200). Planned where every warp
// has one row set (one wave of clusters) and the split uses no fewer blocks than the plan without it (min_blocks):
// the largest kc of 8, 4, 2 that does. Launches it and returns true with the launch's error in e, or returns false.
template <int T, int NB>
bool launch_kc(cudaStream_t s, MatvecArgs a, int groups, int64_t min_blocks, cudaError_t& e) {
    if constexpr (WT<T>::xb != 0 || NB < 2) {
        return false;
    } else {
        if (a.n_tok < 2 || props().cc < 90) return false;  // NB 2 also serves one token over short rows
        auto kernel = matvec_kernel<T, NB, false, true>;
        const int64_t row_blocks = ceil_div(ceil_div(a.rows, rows_per_warp<NB>()), kWarps);
        for (int kc = 8; kc >= 2; kc /= 2) {
            if (a.cols % (kc * Stage<T, WT<T>::sps>::weights) || row_blocks * kc < min_blocks) continue;
            MatvecArgs k = a;
            k.cols = a.cols / kc;
            const size_t smem = stage_x<T, NB>(k);
            if ((int64_t)cluster_fit(kernel, dim3(kc), dim3(kThreads), smem) < row_blocks * groups) continue;
            a.kc = kc;
            a.ks = 1;
            a.x_smem = k.x_smem;
            a.x16 = k.x16;
            e = allow_smem(kernel, smem);
            if (e == cudaSuccess)
                e = launch_cluster(dim3(kc), kernel, dim3((unsigned)(row_blocks * kc), groups), dim3(kThreads), smem,
                                   s, a);
            return true;
        }
        return false;
    }
}

// JOB: a.job.blocks more blocks, resident with the product's.
template <int T, int NB, bool JOB = false>
cudaError_t matvec_launch(cudaStream_t s, MatvecArgs a, int groups) {
    auto kernel = matvec_kernel<T, NB, JOB>;
    const size_t smem = stage_x<T, NB>(a);
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const int jobs = JOB ? a.job.blocks : 0;
    const int64_t warps = (int64_t)std::max(1, resident_blocks(kernel, kThreads, smem) / groups - jobs) * kWarps;
    const int64_t blocks = plan_ks<T, NB>(a, warps) + jobs;
    if constexpr (!JOB)
        if (launch_kc<T, NB>(s, a, groups, blocks, e)) return e;
    a.contig = a.ks == 1 && !JOB && a.rows * a.row_bytes >= kContigBytes;
    return launch(kernel, dim3((unsigned)blocks, groups), dim3(kThreads), smem, s, a);
}

// matvec_pair_kernel: the resident blocks shared by the two products in proportion to their bytes.
template <int T0, int NB0, int T1, int NB1>
cudaError_t matvec_pair(cudaStream_t s, MatvecArgs a, MatvecArgs b) {
    auto kernel = matvec_pair_kernel<T0, NB0, T1, NB1>;
    const size_t smem = std::max(stage_x<T0, NB0>(a), stage_x<T1, NB1>(b));
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const int resident = std::max(2, resident_blocks(kernel, kThreads, smem));
    const double bytes0 = (double)a.rows * a.row_bytes, bytes1 = (double)b.rows * b.row_bytes;
    const int64_t n0 = std::clamp<int64_t>((int64_t)(resident * bytes0 / (bytes0 + bytes1) + 0.5), 1, resident - 1);
    a.blocks = (int)plan_ks<T0, NB0>(a, n0 * kWarps);
    const int64_t blocks = a.blocks + plan_ks<T1, NB1>(b, (resident - n0) * kWarps);
    return launch(kernel, dim3((unsigned)blocks), dim3(kThreads), smem, s, a, b);
}

// ---- Q8_0 and F16 for 3 to 16 tokens on tensor cores -------------------------------------------------------------
//
// With several tokens the dp4a / FMA paths above are bound by issue, not bytes (~15 instructions per 32 Q8_0
// weights, row and token; attn_q_b at 8 tokens: 26% of the copy bandwidth). Here each warp takes sets of 16 weight
// rows, or a slice of their K shared by ks warps of the block (by makespan as above), and streams stages of
// weights (16 rows x 272 bytes: 256 Q8_0 weights, or 128 F16 weights in 256 bytes) through its own cp.async ring,
// on from one set to the next. The tokens' activations come from the workspace: where they fit (XW: every DS4
// product but the compressors' joined F16 ones), the block stages them for the whole K once, before its warps
// stream weights alone; F16 products too wide for that split K over a cluster's blocks on sm_90 (KC), each
// staging its slice whole; else each ring slot carries its stage's activations beside the weights. Q8_0: per 32
// weights one int8 mma m16n8k32 per 8 tokens gives the exact integer sums, then acc += (dw dx) sum as the dp4a path
// does. F16: the activations as two f16 parts (high, and the rounding of the rest; each token scaled by a power of
// two, as the prefill products take them), two f16 mma m16n8k16 per 16 weights into f32. A set's slices meet in
// shared memory, added in slice order. Needs the workspace and rows of whole stages (every DS4 product).
constexpr int kMmaPitch = 272;  // shared-memory pitch of a stage's row (conflict-free fragments)

// XW: the activations staged whole, 8 warps with rings of 4 stages at 8 tokens, 3 at 16 (H200, 4-layer file: 3
// at 8 tokens +2.5 us per step, 4 at 16 tokens +10); else 4 warps whose ring slots (3 stages at 8 tokens, 2 at 16)
// hold each stage's activations beside its weights. KC > 1 (with XW, sm_90): a cluster's KC blocks take the same
// row sets, block `rank` of them the K slice rank cols / KC ..., staging only that slice of the activations (cols
// below is the slice's); the slices' sums meet in distributed shared memory, added in rank order.
template <int T, int NT, bool XW, int KC = 1>
struct MmaMv {
    static constexpr bool F16 = T == TYPE_F16;
    static constexpr int warps = XW ? 8 : 4, depth = (XW ? 4 : 3) - (NT - 1);
    static constexpr int tok = 8 * NT;                 // token columns (n8 tiles of the mma)
    static constexpr int kw = F16 ? 128 : 256;         // weights per stage of a row
    static constexpr int w_piece = F16 ? 16 : 17;      // 16-byte pieces of a stage of a row
    static constexpr int w_bytes = 16 * kMmaPitch, x_bytes = tok * kMmaPitch;
    static constexpr int slot = XW ? w_bytes : w_bytes + x_bytes + (F16 ? x_bytes : tok * 32);  // weights, then
                                                       // the stage's activations and Q8_0 scales or F16 low parts
    // XW: per token its K values' bytes (F16: each part's) padded by 16, so that the fragments' lanes meet no bank
    // twice; then the F16 low parts, or the Q8_0 scales (cols / 32 + 4 floats per token).
    __host__ __device__ static int64_t x_pitch(int64_t cols) { return (F16 ? 2 * cols : cols) + 16; }
    __host__ __device__ static int64_t d_pitch(int64_t cols) { return cols / 32 + 4; }
    static size_t smem(int64_t cols) {
        const size_t x = XW ? (size_t)tok * (x_pitch(cols) + (F16 ? x_pitch(cols) : 4 * d_pitch(cols))) : 0;
        return (size_t)warps * depth * slot + (size_t)(KC > 1 ? 2 : 1) * warps * 16 * tok * sizeof(float) + x;
    }
};

template <int T, int NT, bool XW, int KC>
__global__ void __launch_bounds__(32 * MmaMv<T, NT, XW, KC>::warps) matvec_mma_kernel(MatvecArgs a) {
    using M = MmaMv<T, NT, XW, KC>;
    static_assert(KC == 1 || XW, "a K split stages its slice whole");
    constexpr int W = M::warps, D = M::depth;
    extern __shared__ __align__(16) uint8_t smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    uint8_t* ring = smem + (size_t)warp * D * M::slot;
    float* red = (float*)(smem + (size_t)W * D * M::slot);
    float* part = red + W * 16 * M::tok;                          // KC > 1: the block's sums of its slice
    uint8_t* xs = (uint8_t*)(part + (KC > 1 ? W * 16 * M::tok : 0));  // XW's activations
    pdl_trigger();

    // Block (cluster with KC > 1) iteration it covers sets (blk + it n_blk) per_it + warp / ks, this warp the K
    // slice warp % ks of its set (of the block's K slice `rank`): n_per stages from s0.
    const int rank = (int)(blockIdx.x % KC);
    const unsigned blk = blockIdx.x / KC, n_blk = gridDim.x / KC;
    const int grp = blockIdx.y, ks = a.ks, per_it = W / ks, slice = warp % ks;
    const int n_sets = (int)ceil_div(a.rows, 16), n_it_all = (int)ceil_div(n_sets, per_it);
    const int n_it = blk < n_it_all ? (n_it_all - 1 - blk) / n_blk + 1 : 0;
    const int64_t cols = a.cols / KC;  // the block's K slice
    const int nst = (int)(cols / M::kw), s0 = slice * nst / ks, n_per = (slice + 1) * nst / ks - s0;
    const int total = n_it * n_per;  // this warp's stages, in order
    const int n_tok = a.n_tok;
    const uint8_t* wg = a.w + (size_t)grp * a.rows * a.row_bytes;
    // Workspace: Q8_0 act_view planes per group (int8, then a float per 32); F16 the high and low f16 planes, then
    // a float scale per token. A stage's activations in shared memory: token t's at x + t xp (from the stage's
    // first weight), the F16 low parts at x2 + t xp, the Q8_0 scales at x2 + t dp (floats).
    const uint8_t* xq = a.xq + (M::F16 ? 0 : grp * act_bytes<TYPE_Q8_0>(n_tok, a.cols));
    const uint8_t* xd = xq + (size_t)n_tok * a.cols * (M::F16 ? 2 : 1);
    const int xp = XW ? (int)M::x_pitch(cols) : kMmaPitch, dp = XW ? (int)M::d_pitch(cols) : 8;
    auto set_of = [&](int it) { return (blk + it * n_blk) * per_it + warp / ks; };
    // Lane l copies pieces l, l + 32, ... of a stage (row by row: a warp's copy reads whole 128-byte lines); their
    // offsets in a set's rows, found once.
    constexpr int kPieces = 16 * M::w_piece, NP = (kPieces + 31) / 32;
    int src_off[NP];
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const int p = min(lane + 32 * i, kPieces - 1), r = p / M::w_piece;
        src_off[i] = r * (int)a.row_bytes + 16 * (p - r * M::w_piece);
    }
    // The weights' copies here stay at normal L2 priority: with cp_async16_stream's cache hint, ptxas 13.0 emitted
    // this kernel's copies with an unset descriptor register (an illegal instruction at run time, batch 8).
    auto issue_w = [&](int j) {  // this warp's stage j: 16 rows
        uint8_t* dst = ring + (j % D) * M::slot;
        const int it = j / n_per;
        const int64_t row0 = (int64_t)set_of(it) * 16,
                      off = (int64_t)(rank * nst + s0 + j - it * n_per) * M::w_piece * 16;
#pragma unroll
        for (int i = 0; i < NP; ++i) {
            const int p = lane + 32 * i;  // piece p: row p / w_piece, at 16 p in the slot (272 = 17 x 16) or F16's
            if (p >= kPieces) break;      // row p / 16 and piece p % 16
            uint8_t* d = dst + (M::F16 ? (p >> 4) * kMmaPitch + 16 * (p & 15) : 16 * p);
            if (row0 + 16 <= a.rows) {
                cp_async16(d, wg + row0 * a.row_bytes + off + src_off[i]);
            } else {  // a short last set re-reads its last row
                const int r = p / M::w_piece;
                cp_async16(d, wg + min(row0 + r, a.rows - 1) * a.row_bytes + off + 16 * (p - r * M::w_piece));
            }
        }
    };
    auto issue_x = [&](int j) {  // !XW: the tokens' activations of stage j, 256 bytes each, and the Q8_0 scales
        uint8_t* dst = ring + (j % D) * M::slot + M::w_bytes;  // or the F16 low parts
        const int64_t k0 = (int64_t)(s0 + j % n_per) * M::kw, kb = k0 * (M::F16 ? 2 : 1);
        constexpr int per_tok = M::F16 ? 32 : 18;
        for (int p = lane; p < n_tok * per_tok; p += 32) {
            const int t = p / per_tok, c = p - per_tok * t;
            if (c < 16) {
                cp_async16(dst + t * kMmaPitch + 16 * c, xq + t * a.cols * (M::F16 ? 2 : 1) + kb + 16 * c);
            } else if constexpr (M::F16) {
                cp_async16(dst + M::x_bytes + t * kMmaPitch + 16 * (c - 16), xd + t * a.cols * 2 + kb + 16 * (c - 16));
            } else {
                cp_async16(dst + M::x_bytes + t * 32 + 16 * (c - 16),
                           (const float*)xd + t * (a.cols / 32) + k0 / 32 + 4 * (c - 16));
            }
        }
    };
    // The first stages' weights before the previous kernel is done (they never depend on it), then activations:
    // XW all of them once (in the first commit group, with those weights), else each stage's.
    for (int j = 0; j < D - 1 && j < total; ++j) issue_w(j);
    pdl_wait();
    if constexpr (XW) {  // the slice's values of each token (and Q8_0 its scales)
        constexpr int vb = M::F16 ? 2 : 1;  // bytes per value (per part)
        const int per = (int)(cols * vb / 16);  // 16-byte pieces of a token's values
        for (int i = threadIdx.x; i < n_tok * per; i += 32 * W) {
            const int t = i / per, c = i - t * per;
            const int64_t src = KC == 1 ? (int64_t)16 * i : (t * a.cols + rank * cols) * vb + 16 * c;
            cp_async16(xs + t * xp + 16 * c, xq + src);
            if constexpr (M::F16) cp_async16(xs + (M::tok + t) * xp + 16 * c, xd + src);
        }
        if constexpr (!M::F16) {
            const int pd = (int)(cols / 128);  // 16-byte pieces of a token's scales
            for (int i = threadIdx.x; i < n_tok * pd; i += 32 * W) {
                const int t = i / pd, c = i - t * pd;
                cp_async16(xs + M::tok * xp + 4 * t * dp + 16 * c,
                           xd + (KC == 1 ? (int64_t)16 * i : (t * a.cols + rank * cols) / 8 + 16 * c));
            }
        }
    }
    for (int j = 0; j < D - 1; ++j) {
        if (!XW && j < total) issue_x(j);
        cp_async_commit();
    }
    if constexpr (XW) {
        cp_async_wait<D - 2>();
        __syncthreads();  // every thread's copies of the activations are in before any warp reads them
    }

    for (int it = 0, j = 0; it < n_it; ++it) {
        float acc[NT][4] = {};
        for (int k = 0; k < n_per; ++k, ++j) {
            cp_async_wait<D - 2>();
            __syncwarp();  // stage j is in, and every lane is done with the slot the next copies overwrite
            if (j + D - 1 < total) {
                issue_w(j + D - 1);
                if constexpr (!XW) issue_x(j + D - 1);
            }
            cp_async_commit();
            const uint8_t* w = ring + (j % D) * M::slot;
            const int64_t k0 = (int64_t)(s0 + k) * M::kw;  // the stage's first weight
            const uint8_t* x = XW ? xs + k0 * (M::F16 ? 2 : 1) : w + M::w_bytes;
            const uint8_t* x2 = !XW ? x + M::x_bytes : M::F16 ? x + M::tok * xp : xs + M::tok * xp + 4 * (k0 / 32);
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                uint32_t af[4];
                if constexpr (M::F16) {  // rows g and g + 8, f16 weights 16 b + 2 t ... as they are
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int q = 0; q < 2; ++q)
                            af[2 * q + h] = *(const uint32_t*)(w + (g + 8 * h) * kMmaPitch + 32 * b + 16 * q + 4 * t4);
#pragma unroll
                    for (int ni = 0; ni < NT; ++ni) {
                        const int at = (8 * ni + g) * xp + 32 * b + 4 * t4;
                        const uint32_t hi[2] = {*(const uint32_t*)(x + at), *(const uint32_t*)(x + at + 16)};
                        const uint32_t lo[2] = {*(const uint32_t*)(x2 + at), *(const uint32_t*)(x2 + at + 16)};
                        mma_f16(acc[ni], af, hi);
                        mma_f16(acc[ni], af, lo);
                    }
                } else {
                    // Rows g and g + 8 of Q8_0 block b: f16 scale at 34 b, quants from 34 b + 2 (2 bytes past a
                    // word for even b: two aligned words and a funnel shift).
                    float dw[2];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const uint8_t* rp = w + (g + 8 * h) * kMmaPitch + 34 * b;
                        dw[h] = f16_at(rp);
#pragma unroll
                        for (int q = 0; q < 2; ++q) {
                            const int at = 2 + 16 * q + 4 * t4;
                            if (b & 1) {
                                af[2 * q + h] = *(const uint32_t*)(rp + at);
                            } else {
                                const uint32_t* wp = (const uint32_t*)(rp + at - 2);
                                af[2 * q + h] = __funnelshift_r(wp[0], wp[1], 16);
                            }
                        }
                    }
                    const float* dx = (const float*)x2;
#pragma unroll
                    for (int ni = 0; ni < NT; ++ni) {
                        const uint8_t* xr = x + (8 * ni + g) * xp + 32 * b + 4 * t4;
                        const uint32_t bf[2] = {*(const uint32_t*)xr, *(const uint32_t*)(xr + 16)};
                        int ci[4];
                        mma_s8_new(ci, af, bf);
                        const float d0 = dx[(8 * ni + 2 * t4) * dp + b], d1 = dx[(8 * ni + 2 * t4 + 1) * dp + b];
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            acc[ni][e] = fmaf(dw[e >> 1] * ((e & 1) ? d1 : d0), (float)ci[e], acc[ni][e]);
                    }
                }
            }
        }
        // The slices' partial sums, then per (row, token) in slice order (F16: times the token's scale).
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                red[(warp * 16 + g + 8 * (e >> 1)) * M::tok + 8 * ni + 2 * t4 + (e & 1)] = acc[ni][e];
        __syncthreads();
        const int n_out = per_it * 16 * n_tok;
        // Output o: token t of row `row` (sums of set sw of the iteration's), F16 times the token's scale.
        auto at = [&](int o, int& sw, int& r, int& t) {
            sw = o / (16 * n_tok), r = (o - sw * 16 * n_tok) / n_tok, t = o % n_tok;
            return (int64_t)((blk + it * n_blk) * per_it + sw) * 16 + r;
        };
        auto store = [&](int t, int64_t row, float v) {
            if constexpr (M::F16) v *= ((const float*)(xd + (size_t)n_tok * a.cols * 2))[t];
            *out_at(a, grp, t, row) = v;
        };
        for (int o = threadIdx.x; o < n_out; o += 32 * W) {
            int sw, r, t;
            const int64_t row = at(o, sw, r, t);
            if (KC == 1 && row >= a.rows) continue;
            float v = 0.0f;
            for (int k = 0; k < ks; ++k) v += red[((sw * ks + k) * 16 + r) * M::tok + t];
            if constexpr (KC > 1) part[o] = v;
            else store(t, row, v);
        }
        if constexpr (KC > 1) {  // block `rank` adds up outputs rank, rank + KC, ... over the cluster's slices
            cluster_sync();
            for (int o = rank + KC * (int)threadIdx.x; o < n_out; o += KC * 32 * W) {
                int sw, r, t;
                const int64_t row = at(o, sw, r, t);
                if (row >= a.rows) continue;
                float v = 0.0f;
#pragma unroll
                for (int q = 0; q < KC; ++q) v += cluster_at(part, q)[o];
                store(t, row, v);
            }
            cluster_sync();  // the cluster's parts are read before the next iteration's overwrite them
        } else {
            __syncthreads();  // red is read before the next iteration's sums overwrite it
        }
    }
}

// Clusters of matvec_mma_kernel<T, NT, true, KC> with smem bytes of shared memory that run at once (the driver
// asked again only for another size: DS4's products of this path have one).
template <int T, int NT, int KC>
int mma_clusters(size_t smem) {
    static size_t asked = 0;
    static int fit = 0;
    if (smem != asked) {
        fit = cluster_fit(matvec_mma_kernel<T, NT, true, KC>, dim3(KC), dim3(32 * MmaMv<T, NT, true, KC>::warps),
                          smem);
        asked = smem;
    }
    return fit;
}

// Warps per set (ks) and blocks (clusters of KC) by the smallest makespan, as matvec_launch does.
template <int T, int NT, bool XW, int KC = 1>
cudaError_t matvec_mma(cudaStream_t s, MatvecArgs a, int groups) {
    using M = MmaMv<T, NT, XW, KC>;
    auto kernel = matvec_mma_kernel<T, NT, XW, KC>;
    const size_t smem = M::smem(a.cols / KC);
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const int64_t sets = ceil_div(a.rows, 16), nst = a.cols / KC / M::kw;
    const int64_t blocks = std::max(1, (KC > 1 ? mma_clusters<T, NT, KC>(smem)
                                               : resident_blocks(kernel, 32 * M::warps, smem)) / groups);
    double best = 1e300;
    int64_t grid = 1;
    for (int ks = 1; ks <= M::warps && ks <= nst; ks *= 2) {
        const int64_t iters = ceil_div(sets, M::warps / ks), used = std::min(iters, blocks);
        const double cost = (double)ceil_div(iters, used) * ((double)ceil_div(nst, ks) + 0.5);
        if (cost < best - 1e-9) best = cost, a.ks = ks, grid = used;
    }
    return launch_cluster(dim3(KC), kernel, dim3((unsigned)(grid * KC), groups), dim3(32 * M::warps), smem, s, a);
}

// The shared memory of XW for n tokens' activations of `cols` (with KC: a slice of cols / KC).
template <int T, int KC = 1>
size_t mma_whole_smem(int n, int64_t cols) {
    return n <= 8 ? MmaMv<T, 1, true, KC>::smem(cols / KC) : MmaMv<T, 2, true, KC>::smem(cols / KC);
}

// Whether n tokens' activations of `cols` fit in shared memory whole (XW) beside the rings (with KC: a slice of
// cols / KC).
template <int T, int KC = 1>
bool mma_whole(int n, int64_t cols) {
    return cols % (KC * MmaMv<T, 1, true>::kw) == 0 && mma_whole_smem<T, KC>(n, cols) <= props().smem_optin;
}

// XW over a K split of KC blocks where its slices fit and its clusters run: launches it and returns true with the
// launch's error in e, or returns false.
template <int T, int KC>
bool matvec_mma_kc(cudaStream_t s, const MatvecArgs& a, int groups, cudaError_t& e) {
    if (!mma_whole<T, KC>(a.n_tok, a.cols)) return false;
    const bool one = a.n_tok <= 8;
    const size_t smem = mma_whole_smem<T, KC>(a.n_tok, a.cols);
    if ((one ? mma_clusters<T, 1, KC>(smem) : mma_clusters<T, 2, KC>(smem)) < groups) return false;
    e = one ? matvec_mma<T, 1, true, KC>(s, a, groups) : matvec_mma<T, 2, true, KC>(s, a, groups);
    return true;
}

// XW where the activations fit; else for F16 on sm_90 XW over a K split, the smallest cluster whose slices fit
// (DS4: the compressors' joined products of a ratio-4 layer, 2,624 rows of 4096, at 8 tokens in clusters of 2:
// on an H200 the layer -5 to -9 us at batch 8, where on the ring-slot kernel their 164 blocks ran beside q_b at 1.5
// TB/s; clusters of 4, or fewer clusters leaving SMs to q_b, gained less); else the ring-slot kernel.
template <int T>
cudaError_t matvec_mma_any(cudaStream_t s, const MatvecArgs& a, int groups) {
    const bool one = a.n_tok <= 8;
    if (mma_whole<T>(a.n_tok, a.cols))
        return one ? matvec_mma<T, 1, true>(s, a, groups) : matvec_mma<T, 2, true>(s, a, groups);
    if constexpr (T == TYPE_F16) {
        cudaError_t e = cudaSuccess;
        if (props().cc >= 90 && (matvec_mma_kc<T, 2>(s, a, groups, e) || matvec_mma_kc<T, 4>(s, a, groups, e) ||
                                 matvec_mma_kc<T, 8>(s, a, groups, e)))
            return e;
    }
    return one ? matvec_mma<T, 1, false>(s, a, groups) : matvec_mma<T, 2, false>(s, a, groups);
}

// Whether a product's shape takes the tensor-core path: 3+ tokens with a workspace (F16: one group, and 256+ rows;
// the split of the activations is one more launch), whole stages, rows and base on 16-byte boundaries (Q8_0 rows of
// 256 k weights: 272 k bytes). Q8_0 takes it once its activations are quantized into the workspace. F16 at 8 tokens
// of 4096 alone: 256 rows took 13.1 us against 10.4 on the FMA path, 1024 rows 15.0 against 14.5, 4096 rows 20.8
// against 36.5; but in a batch-8 decode step the router's 256 rows on tensor cores took 2.6 us less per layer
// (H200, 4-layer file, 2026-11-29). The HC mixers' 24 rows stay on the FMA path.
constexpr int64_t kMmaF16MinRows = 256;
template <int T>
bool mma_ok(const MatvecArgs& a, int groups, const void* work) {
    using M = MmaMv<T, 2, false>;
    return (T != TYPE_F16 || (groups == 1 && a.rows >= kMmaF16MinRows)) && work && a.n_tok > kQuantizeAbove &&
           a.cols % M::kw == 0 && (uintptr_t)a.w % 16 == 0 && props().cc >= 80 &&
           M::smem(a.cols) <= props().smem_optin;
}

template <int T>
struct MatvecOp {
    static cudaError_t run(cudaStream_t s, MatvecArgs a, int groups, void* work) {
        if (a.xq && fits(a.n_tok, a.cols) > props().smem_optin)  // the filled workspace serves one chunk of all rows
            return invalid("matvec: work_filled needs the activations of all rows in shared memory");
        if constexpr (T == TYPE_Q8_0) {
            // More than 8 tokens whose activations leave no room for XW's rings where 8 tokens' do (DS4's attn_out_b:
            // 16 tokens of 8192): two products of up to 8 tokens, each with its own quantized activations, read the
            // weights twice and still take less than one on the ring-slot path (H200: 35 against 68 us). Not with the
            // workspace filled by the caller (a.xq: its layout is the whole product's).
            if (a.n_tok > 8 && !a.xq && mma_ok<T>(a, groups, work) && !mma_whole<T>(a.n_tok, a.cols) &&
                mma_whole<T>(8, a.cols)) {
                for (int t0 = 0; t0 < a.n_tok; t0 += 8) {
                    cudaError_t e = run(s, token_chunk(a, t0, std::min(8, a.n_tok - t0)), groups, work);
                    if (e != cudaSuccess) return e;
                }
                return cudaSuccess;
            }
        }
        if constexpr (WT<T>::xb != 0) {
            if (work && !a.xq && a.n_tok > kQuantizeAbove && fits(a.n_tok, a.cols) <= props().smem_optin) {
                cudaError_t e = quantize_groups<T>(s, (uint8_t*)work, a.x, a.cols, a.x_stride, a.n_tok, a.cols, groups,
                                                   a.norm_w, a.norm_eps, a.xn);
                if (e != cudaSuccess) return e;
                a.xq = (const uint8_t*)work;
            }
        }
        if constexpr (T == TYPE_Q8_0 || T == TYPE_F16) {
            if (mma_ok<T>(a, groups, work) && (T == TYPE_F16 || a.xq)) {
                if constexpr (T == TYPE_F16) {  // the activations' two f16 parts and scales, once
                    cudaError_t e = quantize_into(s, (uint8_t*)work, a.x, a.x_stride, a.n_tok, a.cols, TYPE_F16);
                    if (e != cudaSuccess) return e;
                    a.xq = (const uint8_t*)work;
                }
                return matvec_mma_any<T>(s, a, groups);
            }
        }
        // Tokens in chunks whose activations fit in shared memory (each chunk reads the weights again: only
        // rows much wider than DS4's 8192 quantized columns need more than one).
        const size_t limit = props().smem_optin;
        int chunk = 16;
        while (chunk > 1 && fits(chunk, a.cols) > limit) chunk /= 2;
        // Float weights: more than 8 tokens whose rows shared memory holds neither as f32 nor as f16, where 8
        // tokens' rows fit, as products of 8 (each reads the weights again, where every warp would read the f32
        // rows from L2 for each pair of weight rows: DS4's router at 16 tokens, H200, the 4-layer file -2.4%).
        if constexpr (WT<T>::xb == 0)
            if (a.n_tok > 8 && !stages<16>(a) && stages<8>(a)) chunk = 8;
        for (int t0 = 0; t0 < a.n_tok; t0 += chunk) {
            cudaError_t e = tokens(s, token_chunk(a, t0, std::min(chunk, a.n_tok - t0)), groups);
            if (e != cudaSuccess) return e;
        }
        return cudaSuccess;
    }
    // The product of tokens t0 .. t0 + n - 1 alone.
    static MatvecArgs token_chunk(const MatvecArgs& a, int t0, int n) {
        MatvecArgs c = a;
        c.n_tok = n;
        c.x += t0 * a.x_stride;
        c.y += t0 * a.y_stride;
        if (a.xn) c.xn += t0 * a.cols;
        for (int k = 0; k < a.n_parts; ++k) c.part_y[k] += t0 * (a.part_end[k] - (k ? a.part_end[k - 1] : 0));
        return c;
    }
    template <int NB>
    static bool stages(MatvecArgs a) {  // float weights: whether NB tokens' rows are staged in shared memory
        stage_x<T, NB>(a);
        return a.x_smem || a.x16;
    }
    static size_t fits(int n, int64_t cols) {
        return n <= 1 ? matvec_smem<T, 1>(cols, false, false) : n <= 2 ? matvec_smem<T, 2>(cols, false, false)
             : n <= 4 ? matvec_smem<T, 4>(cols, false, false) : n <= 8 ? matvec_smem<T, 8>(cols, false, false)
                      : matvec_smem<T, 16>(cols, false, false);
    }
    static cudaError_t tokens(cudaStream_t s, const MatvecArgs& a, int groups) {
        if (a.n_tok <= 2) {
            if (nb_of<T>(a.n_tok, a.cols) == 1) return matvec_launch<T, 1>(s, a, groups);
            return matvec_launch<T, 2>(s, a, groups);
        }
        if (a.n_tok <= 4) return matvec_launch<T, 4>(s, a, groups);
        if (a.n_tok <= 8) return matvec_launch<T, 8>(s, a, groups);
        return matvec_launch<T, 16>(s, a, groups);
    }
};

__global__ void quantize_kernel(int8_t* qs, float* d, int16_t* bs, const float* x, int64_t x_stride, int n_tok,
                                int64_t cols, int kind, int order) {
    pdl_trigger();
    pdl_wait();
    const int first = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), step = gridDim.x * (blockDim.x >> 5);
    if (kind == 32) quantize_rows<32>(qs, d, bs, x, x_stride, n_tok, cols, first, step);
    else if (order == kActPairs) quantize_rows<256, 0, true>(qs, d, bs, x, x_stride, n_tok, cols, first, step);
    else if (order == kActF16Sums)
        quantize_rows<256, 0, false, true>(qs, d, bs, x, x_stride, n_tok, cols, first, step);
    else quantize_rows<256>(qs, d, bs, x, x_stride, n_tok, cols, first, step);
}

}  // namespace

cudaError_t quantize_act(cudaStream_t s, int8_t* qs, float* d, int16_t* bsums, const float* x, int64_t x_stride,
                         int n_tok, int64_t cols, int kind, int order) {
    const int64_t blocks = n_tok * (cols / kind);
    const int per_warp = kind == 32 ? quantize_per_warp<32> : quantize_per_warp<256>;
    const int grid = (int)std::min<int64_t>(ceil_div(blocks, kWarps * per_warp), 4 * props().sms);
    return launch(quantize_kernel, dim3(grid), dim3(kThreads), 0, s, qs, d, bsums, x, x_stride, n_tok, cols, kind,
                  order);
}

}  // namespace ds4::cuda

using namespace ds4;
using namespace ds4::cuda;

size_t ds4_cuda_matvec_work_bytes(int type, int n_tok, int64_t cols, int groups) {
    if (n_tok <= kQuantizeAbove) return 0;
    if (type == TYPE_F16) return groups == 1 && cols % 128 == 0 ? (size_t)n_tok * (cols * 4 + 4) : 0;  // f16 parts
    return groups * act_bytes_of(type, n_tok, cols);
}

namespace {
// The argument checks of ds4_cuda_matvec (y_stride: the output row stride it needs at n_tok > 1; work_filled: work
// already holds the quantized activations).
cudaError_t check_matvec(const void* w, int type, int64_t rows, int64_t cols, const float* x, int64_t x_stride,
                         int n_tok, int groups, int64_t y_stride, const void* work, bool work_filled = false) {
    if (block_weights(type) == 0) return invalid("matvec: unsupported weight type " + std::to_string(type));
    if (!cols_ok(type, cols))
        return invalid("matvec: cols=" + std::to_string(cols) + " is not a whole number of blocks of type " +
                       std::to_string(type) + " (float rows: a multiple of 8)");
    if (rows <= 0 || n_tok < 1 || n_tok > 16 || groups < 1 || groups > 65535)
        return invalid("matvec: needs rows >= 1, 1 <= n_tok <= 16, 1 <= groups <= 65535");
    if ((uintptr_t)w % 16 || (uintptr_t)x % 16 || x_stride % 4 || (n_tok > 1 && x_stride < cols * groups))
        return invalid("matvec: w and x must be 16-byte aligned and x_stride a multiple of 4 covering a row");
    if (n_tok > 1 && y_stride < rows * groups) return invalid("matvec: y_stride is shorter than a row of y");
    if (type == TYPE_IQ2_XXS && !iq2_tables()) return invalid("matvec: call ds4_cuda_init first");
    if ((uintptr_t)work % 16) return invalid("matvec: work must be 16-byte aligned");
    if (work_filled && (type != TYPE_Q8_0 || n_tok <= kQuantizeAbove || !work))
        return invalid("matvec: work_filled needs Q8_0 weights, n_tok > 2 and the workspace");
    return cudaSuccess;
}

cudaError_t matvec_run(cudaStream_t s, MatvecArgs& a, int type, int groups, void* work) {
    cudaError_t e = cudaSuccess;
    if (!by_type<MatvecOp>(type, e, s, a, groups, work))
        return invalid("matvec: unsupported weight type " + std::to_string(type));
    return e;
}

// The arguments of a product over parts (ds4_cuda_matvec_parts, either of ds4_cuda_matvec_pair's): their rows and
// outputs, checked.
cudaError_t parts_args(MatvecArgs& a, const ds4_cuda_products& p, int64_t cols, const float* x, int64_t x_stride,
                       int n_tok, const void* work = nullptr, bool work_filled = false) {
    if (p.n_parts < 1 || p.n_parts > kMaxParts) return invalid("matvec: 1 to 8 parts per product");
    a = MatvecArgs{nullptr, 0, p.n_parts, {}, {}, (const uint8_t*)p.w, 0, cols, (int64_t)row_bytes(p.type, cols), x,
                   x_stride, n_tok, 1, iq2_tables(), work_filled ? (const uint8_t*)work : nullptr, false, false};
    for (int k = 0; k < p.n_parts; ++k) {
        if (p.rows[k] < 1 || (uintptr_t)p.ys[k] % 4) return invalid("matvec: every part needs rows and a y");
        a.rows += p.rows[k];
        a.part_end[k] = a.rows;
        a.part_y[k] = p.ys[k];
    }
    a.y_stride = a.rows;
    return check_matvec(p.w, p.type, a.rows, cols, x, x_stride, n_tok, 1, a.y_stride, work, work_filled);
}

}  // namespace

cudaError_t ds4_cuda_matvec(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                            int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work,
                            bool work_filled) {
    clear_error();
    const cudaError_t e = check_matvec(w, type, rows, cols, x, x_stride, n_tok, groups, y_stride, work, work_filled);
    if (e != cudaSuccess) return e;
    MatvecArgs a{y, y_stride, 0, {}, {}, (const uint8_t*)w, rows, cols, (int64_t)row_bytes(type, cols), x,
                 x_stride, n_tok, 1, iq2_tables(), work_filled ? (const uint8_t*)work : nullptr, false, false};
    return matvec_run(s, a, type, groups, work);
}

cudaError_t ds4_cuda_matvec_normed(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                                   int64_t cols, const float* x, int64_t x_stride, int n_tok, const float* norm_w,
                                   float eps, float* xn, void* work) {
    clear_error();
    const cudaError_t e = check_matvec(w, type, rows, cols, x, x_stride, n_tok, 1, y_stride, work);
    if (e != cudaSuccess) return e;
    if (act_bytes_of(type, 1, cols) == 0 || !norm_w || (uintptr_t)norm_w % 16 || (uintptr_t)xn % 16)
        return invalid("matvec_normed: needs a quantized weight type and a 16-byte aligned norm weight (and xn)");
    MatvecArgs a{y, y_stride, 0, {}, {}, (const uint8_t*)w, rows, cols, (int64_t)row_bytes(type, cols), x,
                 x_stride, n_tok, 1, iq2_tables(), nullptr, false, false, norm_w, eps, xn};
    return matvec_run(s, a, type, 1, work);
}

cudaError_t ds4_cuda_matvec_parts(cudaStream_t s, float* const* ys, const int64_t* part_rows, int n_parts,
                                  const void* w, int type, int64_t cols, const float* x, int64_t x_stride, int n_tok,
                                  void* work, bool work_filled) {
    clear_error();
    MatvecArgs a;
    const cudaError_t e = parts_args(a, {ys, part_rows, n_parts, w, type}, cols, x, x_stride, n_tok, work,
                                     work_filled);
    if (e != cudaSuccess) return e;
    return matvec_run(s, a, type, 1, work);
}

bool ds4_cuda_matvec_pair_ok(int type0, int type1, int64_t cols, int n_tok) {
    if (type0 != TYPE_Q8_0 || type1 != TYPE_F16 || n_tok < 1 || n_tok > kQuantizeAbove || !cols_ok(type0, cols) ||
        nb_of<TYPE_Q8_0>(n_tok, cols) != nb_of<TYPE_F16>(n_tok, cols))
        return false;
    MatvecArgs f16{};  // its f32 rows staged in shared memory (the F16 kernels' other ways need NB >= 4)
    f16.cols = cols;
    stage_x<TYPE_F16, 2>(f16);
    return f16.x_smem;
}

cudaError_t ds4_cuda_matvec_pair(cudaStream_t s, const ds4_cuda_products* p0, const ds4_cuda_products* p1,
                                 int64_t cols, const float* x, int64_t x_stride, int n_tok) {
    clear_error();
    MatvecArgs a, b;
    cudaError_t e = parts_args(a, *p0, cols, x, x_stride, n_tok);
    if (e == cudaSuccess) e = parts_args(b, *p1, cols, x, x_stride, n_tok);
    if (e != cudaSuccess) return e;
    if (!ds4_cuda_matvec_pair_ok(p0->type, p1->type, cols, n_tok))
        return invalid("matvec_pair: not a pair it computes in one launch (ds4_cuda_matvec_pair_ok)");
    if (nb_of<TYPE_Q8_0>(n_tok, cols) == 1) return matvec_pair<TYPE_Q8_0, 1, TYPE_F16, 1>(s, a, b);
    return matvec_pair<TYPE_Q8_0, 2, TYPE_F16, 2>(s, a, b);
}

template <int T>
struct ActBlock {
    static cudaError_t run(int* xb) {
        *xb = WT<T>::xb;
        return cudaSuccess;
    }
};

cudaError_t ds4_cuda_matvec_quantizing(cudaStream_t s, float* y, const void* w, int type, int64_t rows, int64_t cols,
                                       const float* x, int n_tok, const float* q_x, int q_rows, int64_t q_cols,
                                       int q_type, void* q_work) {
    clear_error();
    if (n_tok < 1 || n_tok > 2) return invalid("matvec_quantizing: 1 or 2 tokens");
    cudaError_t e = check_matvec(w, type, rows, cols, x, cols, n_tok, 1, rows, nullptr);
    if (e != cudaSuccess) return e;
    int xb = 0;
    by_type<ActBlock>(q_type, e, &xb);
    if (xb != 256 || q_rows < 1 || q_cols < 256 || q_cols % 256 || !q_x || !q_work || (uintptr_t)q_x % 16 ||
        (uintptr_t)q_work % 16)
        return invalid("matvec_quantizing: rows of whole Q8_K blocks (a K or IQ2 type), 16-byte aligned x and work");
    MatvecArgs a{y, rows, 0, {}, {}, (const uint8_t*)w, rows, cols, (int64_t)row_bytes(type, cols), x, cols, n_tok, 1,
                 iq2_tables(), nullptr, false, false};
    const int64_t n = q_rows * q_cols;
    a.job = {q_x, (uint8_t*)q_work, q_rows, (int)ceil_div(n_tok * n / 256, kWarps * quantize_per_warp<256>), q_cols};
    if (type == TYPE_Q8_0 && nb_of<TYPE_Q8_0>(n_tok, cols) == n_tok)
        return n_tok == 1 ? matvec_launch<TYPE_Q8_0, 1, true>(s, a, 1) : matvec_launch<TYPE_Q8_0, 2, true>(s, a, 1);
    e = matvec_run(s, a, type, 1, nullptr);  // elsewhere: the product, then the quantizer
    for (int t = 0; t < n_tok && e == cudaSuccess; ++t) {
        uint8_t* b = (uint8_t*)q_work + t * act_bytes<TYPE_Q2_K>(q_rows, q_cols);
        e = ds4_cuda_quantize_act(s, (int8_t*)b, (float*)(b + n), (int16_t*)(b + n + 4 * (n / 256)), q_x + t * n,
                                  q_cols, q_rows, q_cols, 256);
    }
    return e;
}

cudaError_t ds4_cuda_quantize_act(cudaStream_t s, int8_t* qs, float* d, int16_t* bsums, const float* x,
                                  int64_t x_stride, int n_tok, int64_t cols, int kind) {
    clear_error();
    if ((kind != 32 && kind != 256) || cols <= 0 || cols % kind || n_tok < 1 || (kind == 256 && !bsums))
        return invalid("quantize_act: kind must be 32 or 256, cols a positive multiple of it, n_tok >= 1");
    if ((uintptr_t)x % 16 || x_stride % 4) return invalid("quantize_act: x must be 16-byte aligned rows");
    return quantize_act(s, qs, d, bsums, x, x_stride, n_tok, cols, kind, kActCpu);
}
