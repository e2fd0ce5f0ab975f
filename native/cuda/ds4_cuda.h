// The C entry points of the CUDA backend (ds4d._cuda): the decode-path kernels.
//
// Every op is ds4_cuda_<op>(stream, outputs..., inputs..., params) and only enqueues work on `stream`: no host
// synchronization, no allocation, so a sequence of ops can be captured into one CUDA graph and replayed. Values
// that change from step to step (token ids, positions, row counts, routed expert ids and weights) are read from
// device memory by the kernels, never passed by value. Pointers are device pointers; strides count elements.
// Each returns cudaSuccess, cudaErrorInvalidValue for arguments outside what the kernels support (the reason is
// in ds4_cuda_error_message()), or the launch's error.
//
// Launches use programmatic dependent launch on Hopper (sm_90+): a kernel starts while the previous one drains,
// prefetches its weights (which no earlier kernel writes) and waits for the previous kernel's results only before
// reading activations. Every kernel waits before its first write, so completion stays transitive along a stream.
//
// Numerics (docs/CUDA_KERNELS.md): F32/F16/BF16 weights take f32 activations and f32 FMAs. Quantized weights
// (Q8_0, Q2_K, Q4_K, IQ2_XXS) take 8-bit activations exactly as the CPU's act8 path (ds4_quant.h: Q8_0 blocks
// for Q8_0 weights, Q8_K blocks for the others), quantized by each kernel from its f32 input, exact integer dot
// products per 32 weights, f32 from there on; only the order of the f32 sums differs from the CPU.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// ---- runtime ---------------------------------------------------------------------------------------------------

// Prepares the current device (lookup tables, kernel attributes); idempotent, per device.
cudaError_t ds4_cuda_init();
// Programmatic dependent launch on (default) or off; only devices of compute capability >= 9.0 use it.
void ds4_cuda_set_pdl(bool on);
bool ds4_cuda_pdl();
// Why the last call on this thread returned cudaErrorInvalidValue ("" if it did not).
const char* ds4_cuda_error_message();
// Fills `bytes` bytes with valid random blocks of `type` (finite f16 scales of magnitude 2^-14..2^-8, random
// quants; float types get values in about +-1): full-size random weights for benchmarks, no file needed.
cudaError_t ds4_cuda_fill_random(cudaStream_t s, void* dst, size_t bytes, int type, uint64_t seed);

// ---- matrix products -------------------------------------------------------------------------------------------

// y[t, g*rows + r] = sum_k W[g*rows + r, k] * x[t, g*cols + k], for t < n_tok (1..16), g < groups, r < rows.
// W: groups*rows rows of `cols` weights of `type`, row_bytes(type, cols) each, from a 16-byte aligned base
// (cudaMalloc'd memory read up to the next 16-byte boundary). groups > 1 is a block-diagonal product (the grouped
// attention output projection). x rows start 16-byte aligned (x_stride a multiple of 4). work_filled (Q8_0, n_tok
// > 2): work already holds x's quantized activations as this product would fill it (ds4_cuda_attention_decode's
// xq), so no quantize launch runs before the product.
cudaError_t ds4_cuda_matvec(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                            int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work,
                            bool work_filled = false);
// ds4_cuda_matvec (one group) of x's rows RMS-normed with weight norm_w (x * (1 / sqrt(mean(x^2) + eps)) * norm_w:
// ds4_cuda_rms_norm's values to a rounding), which it also writes to xn (dense (n_tok, cols)) when xn is not null:
// a norm between two products needs no launch of its own. Quantized weight types (they take the activations
// quantized).
cudaError_t ds4_cuda_matvec_normed(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                                   int64_t cols, const float* x, int64_t x_stride, int n_tok, const float* norm_w,
                                   float eps, float* xn, void* work);
// One product of ds4_cuda_matvec_pair: n_parts matrices of one type stored back to back from w, part k's rows[k]
// rows written to the dense (n_tok, rows[k]) array ys[k].
struct ds4_cuda_products {
    float* const* ys;
    const int64_t* rows;
    int n_parts;
    const void* w;
    int type;
};
// Two products of the same activation rows in one launch, each as ds4_cuda_matvec_parts computes it (bit for bit
// where each row is one stage; else to the rounding of another order of sums), its blocks shared in proportion
// to the bytes: DS4's q_a and kv (Q8_0) with the compressors' and the indexer's products (F16) of the same input,
// which apart would be two launches on the chain. Only where ds4_cuda_matvec_pair_ok: a Q8_0 and an F16 product
// at 1-2 tokens (the kernels that quantize the rows in every block).
cudaError_t ds4_cuda_matvec_pair(cudaStream_t s, const ds4_cuda_products* p0, const ds4_cuda_products* p1,
                                 int64_t cols, const float* x, int64_t x_stride, int n_tok);
bool ds4_cuda_matvec_pair_ok(int type0, int type1, int64_t cols, int n_tok);
// ds4_cuda_matvec over the rows of several matrices of one type and width stored back to back (the products of
// one input), each part's rows written to its own dense (n_tok, part_rows[k]) array ys[k]: one launch. At most 8
// parts; work and work_filled as for ds4_cuda_matvec with the same type, n_tok and cols.
cudaError_t ds4_cuda_matvec_parts(cudaStream_t s, float* const* ys, const int64_t* part_rows, int n_parts,
                                  const void* w, int type, int64_t cols, const float* x, int64_t x_stride, int n_tok,
                                  void* work, bool work_filled = false);
// ds4_cuda_matvec of n_tok (1 or 2) dense rows x (one group, y dense) that also quantizes each token's q_rows rows
// of q_cols values at q_x (dense, token after token) into q_work as ds4_cuda_moe_down's workspace holds them for
// experts of q_type (a K or IQ2 type: Q8_K activations; ds4_cuda_moe_down_work_bytes(q_type, n_tok, q_rows, q_cols)
// bytes, then passed with work_filled). For Q8_0 rows past half a stage (the shared expert's down) the quantizer runs
// in extra blocks of the same launch, beside the product: the routed experts' down then waits on one launch instead
// of two. Else a second launch.
cudaError_t ds4_cuda_matvec_quantizing(cudaStream_t s, float* y, const void* w, int type, int64_t rows, int64_t cols,
                                       const float* x, int n_tok, const float* q_x, int q_rows, int64_t q_cols,
                                       int q_type, void* q_work);
// Bytes of `work` that lets ds4_cuda_matvec quantize the activations once (quantized types, n_tok > 2) instead of
// in every block, or split them into two f16 parts (F16, one group); 0 when it would not use it. work may always be
// null (slower for several tokens). With it, Q8_0 rows of a multiple of 256 weights run on int8 tensor cores (the
// same integer sums per 32 weights, their float sum in another order) and F16 products of 256+ rows on f16 ones
// (the activations to ~22 bits): a token's outputs may differ in the last bits with the batch it is in.
size_t ds4_cuda_matvec_work_bytes(int type, int n_tok, int64_t cols, int groups);

// The activation quantizer the kernels run on their input, exposed for tests: kind 32 = Q8_0 blocks (qs, d per
// 32), kind 256 = Q8_K blocks (qs, d per 256, bsums per 16 into `bsums`; may be null for kind 32). Outputs are
// dense (n_tok, cols), (n_tok, cols/kind), (n_tok, cols/16).
cudaError_t ds4_cuda_quantize_act(cudaStream_t s, int8_t* qs, float* d, int16_t* bsums, const float* x,
                                  int64_t x_stride, int n_tok, int64_t cols, int kind);

// ---- prefill products (tensor cores) ---------------------------------------------------------------------------

// Whether ds4_cuda_gemm takes this matrix: Q8_0, Q2_K, Q4_K, IQ2_XXS or F16 rows of a multiple of 256 weights.
bool ds4_cuda_gemm_ok(int type, int64_t cols);
// ds4_cuda_matvec's product for any number of activation rows (the prefill), on int8 tensor cores: the same
// quantized activations and exact integer sums per 32 weights, the f32 sums grouped per block of 32 (Q8_0) or 256
// weights; F16 weights against activations split into two f16 parts (~22 bits). Except Q8_0 matrices of 64+
// activation rows on an sm_90 device in a build with CUTLASS, with tile 0, y 16-byte aligned and y_stride and rows
// multiples of 4: those run on wgmma with the weights and activations rounded to bf16 (gemm_sm90.cu). work:
// ds4_cuda_gemm_work_bytes(...) bytes (rows: as here, per group), required. tile: activation rows per block of the
// int8 path (16, 32, 64), 0 to choose by the shape (tests pin it).
cudaError_t ds4_cuda_gemm(cudaStream_t s, float* y, int64_t y_stride, const void* w, int type, int64_t rows,
                          int64_t cols, const float* x, int64_t x_stride, int n_tok, int groups, void* work,
                          int tile = 0);
size_t ds4_cuda_gemm_work_bytes(int type, int n_tok, int64_t rows, int64_t cols, int groups);

// The routed experts of n_tok tokens in one pass (prefill): out[t, :] (+)= sum_j weights[t, j] * down_e
// (silu(min(gate_e . h_t, clamp)) * clip(up_e . h_t, +-clamp)), e = ids[t, j] (outside [0, n_expert): expert 0),
// as ds4_cuda_moe_gate_up + ds4_cuda_moe_down compute it, but each expert's weights read once per tile of up to
// 16, 32 or 64 of its pairs (tile; 0: chosen by the mean pairs per expert; narrowed where shared memory is short):
// the pairs are sorted by expert on the device and each matrix is one grouped tensor-core product. Gate and up
// share gate_type, down has down_type (both ds4_cuda_gemm_ok). work: ds4_cuda_moe_work_bytes(...) bytes.
cudaError_t ds4_cuda_moe_grouped(cudaStream_t s, float* out, int64_t out_stride, const float* h, int64_t h_stride,
                                 const void* gate, const void* up, const void* down, int gate_type, int down_type,
                                 int64_t n_ff, int64_t n_embd, int n_expert, const int32_t* ids,
                                 const float* weights, int n_used, int n_tok, float clamp, bool accumulate,
                                 void* work, int tile = 0);
size_t ds4_cuda_moe_work_bytes(int gate_type, int down_type, int n_tok, int n_used, int64_t n_embd, int64_t n_ff,
                               int n_expert);

// ---- mixture of experts (decode) -------------------------------------------------------------------------------

// mid[t, j, :] = silu(min(g, clamp)) * clip(u, -clamp, clamp) * weights[t, j] with g = gate_e . h_t,
// u = up_e . h_t, e = ids[t, j], for t < n_tok (1..64), j < n_used (1..8). gate/up: n_expert matrices of (n_ff, n_embd)
// weights of `type`, expert after expert. ids/weights (n_tok, n_used) in device memory; ids null means expert j,
// weights null means 1 (the shared expert: n_expert = n_used = 1). An id outside [0, n_expert) reads expert 0.
// mid is dense (n_tok, n_used, n_ff).
cudaError_t ds4_cuda_moe_gate_up(cudaStream_t s, float* mid, const float* h, int64_t h_stride, const void* gate,
                                 const void* up, int type, int64_t n_ff, int64_t n_embd, int n_expert,
                                 const int32_t* ids, const float* weights, int n_used, int n_tok, float clamp);
// The shared expert for ds4_cuda_moe_route_gate_up: its gate and up (Q8_0, n_ff rows of n_embd each), its SwiGLU's
// clamp, and where mid (n_ff floats) goes.
struct ds4_cuda_shared_expert {
    const void* gate;
    const void* up;
    int64_t n_ff;
    float clamp;
    float* mid;
};
// Combine matrices that ds4_cuda_hc_pre left as logits (defer), for a launch to normalize as ds4_cuda_hc_sinkhorn
// does.
struct ds4_cuda_sinkhorn {
    float* hc;  // (n_tok, 20)
    int n_tok, n_iter;
    float hc_eps;
};
// The same, with each token's experts chosen in the kernel from the router's logits as ds4_cuda_route chooses
// them (same arguments; n_expert <= 256): ids and weights are written (for ds4_cuda_moe_down), not read. A decode
// layer then has no launch of its own for the choice. With `shared` (ds4_cuda_moe_shared_ok) the launch also
// computes the shared expert's mid (n_tok rows of n_ff) = silu(min(g, clamp)) * clip(u, -clamp, clamp), g = gate . h,
// u = up . h, exactly as ds4_cuda_matvec of one token then ds4_cuda_swiglu do: its weights stream while the experts
// are being chosen (each token's blocks read them for their token). With `hc` (up to 32 tokens) the launch also
// runs ds4_cuda_hc_sinkhorn's iterations, after its dependency wait.
cudaError_t ds4_cuda_moe_route_gate_up(cudaStream_t s, float* mid, int32_t* ids, float* weights, const float* logits,
                                       const float* bias, const int32_t* tid2eid, const int32_t* tokens, float scale,
                                       bool normalize, const float* h, int64_t h_stride, const void* gate,
                                       const void* up, int type, int64_t n_ff, int64_t n_embd, int n_expert,
                                       int n_used, int n_tok, float clamp,
                                       const ds4_cuda_shared_expert* shared = nullptr,
                                       const ds4_cuda_sinkhorn* hc = nullptr);
// Whether ds4_cuda_moe_route_gate_up takes a shared expert for routed experts of `type` and n_tok tokens.
bool ds4_cuda_moe_shared_ok(int type, int64_t n_embd, int n_tok);
// out[t, :] (+)= sum_j down_e . mid[t, j, :], e = ids[t, j]; down: n_expert matrices of (n_embd, n_ff) weights.
// accumulate adds to out (the shared expert after the routed ones) instead of overwriting it. work (optional: null,
// or ds4_cuda_moe_down_work_bytes(...) bytes): mid is quantized once there instead of in every block (faster);
// work_filled: it already holds them (ds4_cuda_matvec_quantizing), mid is not read.
cudaError_t ds4_cuda_moe_down(cudaStream_t s, float* out, int64_t out_stride, const float* mid, const void* down,
                              int type, int64_t n_embd, int64_t n_ff, int n_expert, const int32_t* ids, int n_used,
                              int n_tok, bool accumulate, void* work = nullptr, bool work_filled = false);
size_t ds4_cuda_moe_down_work_bytes(int type, int n_tok, int n_used, int64_t n_ff);
// The routed experts' mid rows quantized into ds4_cuda_moe_down's workspace for experts of `type` (then passed with
// work_filled), as moe_down would quantize them itself: a launch that can run before the work it would wait behind.
cudaError_t ds4_cuda_moe_down_quantize(cudaStream_t s, void* work, const float* mid, int type, int n_tok, int n_used,
                                       int64_t n_ff);
// mid[i] = silu(min(g[i], clamp)) * clip(u[i], +-clamp) for i < n, as moe_gate_up finishes a pair: the shared
// expert of several tokens as products (its weights read once per matvec block, not once per token). With xq (n a
// multiple of 32), mid's Q8_0 form there too, as ds4_cuda_matvec's workspace holds its rows' (for a product of rows
// of a multiple of 32 values, taken with work_filled): the product after it needs no quantize launch.
cudaError_t ds4_cuda_swiglu(cudaStream_t s, float* mid, const float* g, const float* u, int64_t n, float clamp,
                            void* xq = nullptr);

// ---- attention (decode) ----------------------------------------------------------------------------------------

// One query token per session t < n_tok, n_head heads of dim (128, 256 or 512), K = V rows stored as f16 (f32 with
// f32_rows: exact numerics):
//   raw rows raw[t*raw_stride + i*dim], i < raw_n[t] (<= raw_cap; a ring: order does not matter), then
//   compressed rows comp[t*comp_stride + c*dim] for c in sel[t, 0..sel_cap) where 0 <= c < comp_n[t] when sel is
//   given (the indexer's choice, -1 = none), else every c < comp_n[t] (<= comp_cap).
// With row tables (device arrays of n_tok pointers), token t's rows start at raw_rows[t] / comp_rows[t] instead.
// out[t, h] = sum_r e^(s_r - M) k_r / (e^(sink_h - M) + sum_r e^(s_r - M)), s_r = scale * q[t, h] . k_r.
// raw_n, comp_n (n_tok) are read from device memory. scratch: ds4_cuda_attention_scratch_bytes(...) bytes.
// With rope_pos (n_tok positions, device), each head's last n_rot dims of out are rotated back (the inverse of
// ds4_cuda_rope with those positions and the n_rot / 2 frequencies rope_freq, float64, device): V's rotated tail.
// With kv_x, the decode front (f16 rows where ds4_cuda_attention_prefill_ok(dim); positions required): q holds the
// query heads before their RMSNorm (no weight) and RoPE, kv_x (n_tok rows of dim, device) each token's K=V row
// before its RMSNorm (weight kv_w, dim floats), RoPE and the FP8 round trip of its first n_nope dims (0: none), all
// with eps and the positions' rope_freq; the launch forms both as ds4_cuda_rms_norm_rope and ds4_cuda_kv_store do
// (the same bits), writes the row to raw row rope_pos[t] % raw_cap of token t (its ring slot, one of its raw_n
// rows) and attends over it. raw_n, comp_n, the positions and the row tables are then read before the previous
// kernel's results are (they must come from earlier work, as a step's table does).
// With xq (n_tok > 2, 16-byte aligned), out is also written as Q8_0 activations of xq_groups column groups (heads
// h * xq_groups / n_head), laid out as the workspace that ds4_cuda_matvec fills for a Q8_0 product of out in that
// many groups (ds4_cuda_matvec_work_bytes bytes), the same bits: that product takes it with work_filled.
cudaError_t ds4_cuda_attention_decode(cudaStream_t s, float* out, void* scratch, const float* q, const void* raw,
                                      int64_t raw_stride, const int32_t* raw_n, int raw_cap, const void* comp,
                                      int64_t comp_stride, const int32_t* comp_n, int comp_cap, const int32_t* sel,
                                      int sel_cap, const float* sinks, int n_tok, int n_head, int dim, float scale,
                                      const void* const* raw_rows = nullptr, const void* const* comp_rows = nullptr,
                                      bool f32_rows = false, const int32_t* rope_pos = nullptr,
                                      const double* rope_freq = nullptr, int n_rot = 0, const float* kv_x = nullptr,
                                      const float* kv_w = nullptr, float eps = 0.0f, int n_nope = 0,
                                      void* xq = nullptr, int xq_groups = 0);
size_t ds4_cuda_attention_scratch_bytes(int n_tok, int n_head, int dim, int raw_cap, int comp_cap, int sel_cap,
                                        bool has_sel);
// The same attention for many query tokens (prefill) with f16 rows, on tensor cores: no split, no scratch (each
// block walks all of its token's rows with an online softmax); scores and sums within f32 rounding of
// ds4_cuda_attention_decode's (Q and the probabilities enter as two f16 parts each). With rope_pos (n_tok
// positions, device), q holds the query heads before their RMSNorm (no weight, eps) and RoPE (the last n_rot dims,
// frequencies rope_freq), which the launch applies as ds4_cuda_rms_norm_rope does, and each head's last n_rot dims
// of out are rotated back (the inverse RoPE). ds4_cuda_attention_prefill_ok: whether this device has the shared
// memory the tensor-core attention kernels need for rows of `dim` (the decode splits' 106 KB at 512, the prefill's
// 114 KB: not sm_86 / sm_89).
bool ds4_cuda_attention_prefill_ok(int dim);
cudaError_t ds4_cuda_attention_prefill(cudaStream_t s, float* out, const float* q, const void* raw,
                                       int64_t raw_stride, const int32_t* raw_n, int raw_cap, const void* comp,
                                       int64_t comp_stride, const int32_t* comp_n, int comp_cap, const int32_t* sel,
                                       int sel_cap, const float* sinks, int n_tok, int n_head, int dim, float scale,
                                       const void* const* raw_rows = nullptr, const void* const* comp_rows = nullptr,
                                       const int32_t* rope_pos = nullptr, const double* rope_freq = nullptr,
                                       int n_rot = 0, float eps = 0.0f);

// ---- compressors and indexer (MODEL.md 3.7, 3.8) -----------------------------------------------------------------

// Feeds n_seg segments of consecutive tokens into their sessions' compressors. Segment s is tokens seg_first[s] ..
// + seg_len[s] - 1 (in position order); its frontier is state_kv[s] / state_score[s] (device pointers, each
// (coff*ratio, coff*d) f32: coff = 2 at ratio 4, rows 0..3 the previous block and 4..7 the current one; 1 at ratio
// 128, row pos mod 128), empty rows kv 0 / score -inf. Token t stores kv[t] and gate[t] + ape[pos[t] mod ratio]
// (ape: (ratio, coff*d)) in its row; when (pos[t] + 1) mod ratio == 0 it pools the block by a per-dim softmax over
// the block's rows (at ratio 4: lane A columns j of rows 0..3 with lane B columns d + j of rows 4..7) into
// pooled[t] (d values; other tokens' rows are not written) and resets the frontier (ratio 4: rows 4..7 move to
// 0..3). Positions come from device memory; segments must not share a frontier. n_tok: the tokens of all segments
// (at least n_seg). path: 1 walks each segment's tokens in order (one kernel), 2 pools the blocks in parallel and
// then rewrites the frontier (two kernels; the same bits), 0 picks 2 from 64 tokens.
cudaError_t ds4_cuda_compress(cudaStream_t s, float* pooled, const float* kv, int64_t kv_stride, const float* gate,
                              int64_t gate_stride, const float* ape, const int32_t* pos, const int32_t* seg_first,
                              const int32_t* seg_len, float* const* state_kv, float* const* state_score, int n_seg,
                              int d, int ratio, int n_tok, int path = 0);
// The emitted rows' finish, for each token t whose (pos[t] + 1) mod ratio == 0: y = RMSNorm(pooled[t]) * norm,
// RoPE of the last n_rot dims at position pos[t] + 1 - ratio (inv_freq: n_rot/2 float64), then mode 0: nothing,
// 1: FP8 E4M3 round trip of the first n_nope dims, 2: Hadamard-128 + FP4 (d = 128); stored as f16 (f32 with
// f32_rows) at row (pos[t] + 1) / ratio - 1 of the array dst[t] (n_tok device pointers).
cudaError_t ds4_cuda_comp_finish(cudaStream_t s, void* const* dst, const float* pooled, const float* norm,
                                 const int32_t* pos, const double* inv_freq, int n_tok, int d, int ratio, int n_rot,
                                 int mode, int n_nope, float eps, bool f32_rows);
// In place on n_vec vectors of 128: Walsh-Hadamard (natural order) / sqrt(128), then the FP4 E2M1 round trip per
// 32 values (MODEL.md 3.9): the indexer queries' faithful path. With pos, first the RoPE of each vector's last
// n_rot values as ds4_cuda_rope computes it (the same bits; vector r is token r / vec_per_tok, the n_rot / 2
// frequencies inv_freq, float64, device); the positions are read before the previous kernel's results are.
cudaError_t ds4_cuda_hadamard_fp4(cudaStream_t s, float* x, int64_t n_vec, const int32_t* pos = nullptr,
                                  const double* inv_freq = nullptr, int n_rot = 0, int vec_per_tok = 1);
// Indexer scores: scores[t*score_stride + c] = sum_h (w[t, h] * w_scale) * relu(q[t, h] . keys[t][c]) for
// c < n_vis[t] (<= cap), computed only for tokens with n_vis[t] > top_k (the others take every row). q (n_tok,
// n_head, 128) f32; keys[t]: the token's session's indexer rows (f16, or f32 with f32_rows; 128 each). work: a
// 16-byte aligned area of ds4_cuda_indexer_scores_work_bytes(n_tok, n_head, f32_rows) bytes where that is not 0
// (a prefill chunk's queries, split once), else unused.
cudaError_t ds4_cuda_indexer_scores(cudaStream_t s, float* scores, int64_t score_stride, const float* q,
                                    const float* w, float w_scale, const void* const* keys, const int32_t* n_vis,
                                    int n_tok, int n_head, int dim, int cap, int top_k, bool f32_rows,
                                    void* work = nullptr);
size_t ds4_cuda_indexer_scores_work_bytes(int n_tok, int n_head, bool f32_rows);
// The indexer's choice: sel[t] (k entries) = the k rows of largest score (ties to the lower index) in ascending
// order, or 0 .. n_vis[t] - 1 padded with -1 when n_vis[t] <= k. cluster: the blocks per token (1, or on sm_90 a
// thread block cluster of 4, 8 or 16; 0 chooses by the scores' capacity, score_stride).
cudaError_t ds4_cuda_topk(cudaStream_t s, int32_t* sel, const float* scores, int64_t score_stride,
                          const int32_t* n_vis, int n_tok, int k, int cluster = 0);

// ---- small ops -------------------------------------------------------------------------------------------------

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) (* w if w is not null), for n_rows rows of n values (per-head norms are
// rows of head_dim). In place (y == x) is allowed.
cudaError_t ds4_cuda_rms_norm(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                              const float* w, int64_t n_rows, int64_t n, float eps);
// rms_norm, then on each row's last n_rot values the interleaved-pair RoPE of ds4_cuda_rope at position
// pos[row / rows_per_tok] (pos in device memory; inv_freq: n_rot/2 float64): the query heads (rows_per_tok =
// heads) and the K=V row. n_rot a multiple of 4. `also`: a second set of rows of the same length, eps, positions
// and frequencies in the same launch (the query heads and the K=V row together).
struct ds4_cuda_rows {
    float* y;
    int64_t y_stride;
    const float* x;
    int64_t x_stride;
    const float* w;
    int64_t n_rows;
    int rows_per_tok;
};
cudaError_t ds4_cuda_rms_norm_rope(cudaStream_t s, float* y, int64_t y_stride, const float* x, int64_t x_stride,
                                   const float* w, int64_t n_rows, int64_t n, float eps, const int32_t* pos,
                                   int rows_per_tok, const double* inv_freq, int n_rot,
                                   const ds4_cuda_rows* also = nullptr);

// Hyper-connection pre step (MODEL.md 3.2) for n_tok tokens of n_hc = 4 streams of n_embd: X (n_tok, 4, n_embd)
// rows x_stride apart; fn (n_mix, 4*n_embd) F16/F32/BF16; scale (3) and base (n_mix) f32. n_mix = 24 gives the
// sublayer input x (n_tok, n_embd) and hc (n_tok, 20) = post gates (4) then the Sinkhorn-normalized combine
// matrix (16, row-major C[i][j]); n_mix = 4 is the output head (x only, hc unused). n_embd a multiple of 128;
// scratch: ds4_cuda_hc_pre_scratch_bytes(n_tok, n_embd, n_mix) bytes, 16-byte aligned. norm_w (n_embd, or null):
// x is then RMSNorm(x) * norm_w with rms_eps (the sublayer's own norm, fused), as ds4_cuda_rms_norm computes it.
// post (or null): the previous sublayer's hc_post done first, inside the mixer kernel: the streams X are computed
// from post's old streams (rows x_stride apart; may be X itself), its output f (n_tok, n_embd) and its hc (n_tok,
// 20), bit for bit as ds4_cuda_hc_post computes them, and written to X. On sm_90, up to 8 tokens with n_mix = 24,
// F16 fn and n_embd a multiple of 256 up to 4096 take one launch where all their clusters fit at once (a thread
// block cluster per token; the scratch unused); otherwise the mixer and the finish are two. The two paths add in
// different orders (not bit for bit), and the cluster takes x's norm from the streams' Gram matrix. defer: the
// combine matrix is left as its 16 logits (row-major) for ds4_cuda_hc_sinkhorn to normalize in place, e.g. on
// another stream beside the work that follows (its only reader is the next hc_post); the post gates are final.
// xq (or null; n_embd a multiple of 32): x also as Q8_0 activations, qs (n_tok, n_embd) and d (n_tok, n_embd / 32)
// dense, bit for bit as ds4_cuda_quantize_act makes them (the planes of a Q8_0 product's workspace: its first
// products then take them with work_filled instead of a quantize launch). The cluster launch writes them with x;
// the other path quantizes after it.
struct ds4_cuda_hc_post_in {
    const float* f;
    const float* X;
    const float* hc;
};
struct ds4_cuda_q8_out {
    int8_t* qs;
    float* d;
};
cudaError_t ds4_cuda_hc_pre(cudaStream_t s, float* x, float* hc, float* scratch, float* X, int64_t x_stride,
                            const void* fn, int fn_type, const float* scale, const float* base, int n_tok,
                            int64_t n_embd, int n_mix, int n_iter, float hc_eps, float rms_eps,
                            const float* norm_w = nullptr, const ds4_cuda_hc_post_in* post = nullptr,
                            bool defer = false, const ds4_cuda_q8_out* xq = nullptr);
size_t ds4_cuda_hc_pre_scratch_bytes(int n_tok, int64_t n_embd, int n_mix);
// The combine matrices of hc (n_tok, 20) that ds4_cuda_hc_pre left as logits (defer) normalized in place: the bits
// hc_pre computes without defer.
cudaError_t ds4_cuda_hc_sinkhorn(cudaStream_t s, float* hc, int n_tok, int n_iter, float hc_eps);
// X_out[t, j] = post[t, j] * f[t] + sum_i comb[t, i, j] * X[t, i] (MODEL.md 3.3); X_out may be X; both dense
// (n_tok, 4, n_embd).
cudaError_t ds4_cuda_hc_post(cudaStream_t s, float* X_out, const float* f, const float* X, const float* hc,
                             int n_tok, int64_t n_embd);

// Interleaved-pair RoPE on the last n_rot dims of each of n_head rows of head_dim per token, in place, at
// position pos[t] + pos_delta (pos in device memory); inv_freq: n_rot/2 float64 angular frequencies (the YaRN
// blend precomputed on the host). Angles and their sines in float64. inverse rotates by -theta.
cudaError_t ds4_cuda_rope(cudaStream_t s, float* x, int64_t tok_stride, const int32_t* pos, int pos_delta,
                          const double* inv_freq, int n_tok, int n_head, int head_dim, int n_rot, bool inverse);

// K=V row store: dst[t*dst_stride + slot*dim] = f16(fp8 ? E4M3 round trip of the first n_nope dims : x[t]) with
// slot = ((pos[t] + pos_add) / pos_div) mod ring (the raw window: 0, 1, n_swa). The FP8 round trip is MODEL.md
// 3.9 bit for bit (per 64 values, power-of-two scale, round to nearest even E4M3FN). With a row table (n_tok
// device pointers), token t's array is dst_rows[t] instead of dst + t*dst_stride. f32_rows stores f32 instead of
// f16 (exact numerics).
cudaError_t ds4_cuda_kv_store(cudaStream_t s, void* dst, int64_t dst_stride, const float* x, int64_t x_stride,
                              const int32_t* pos, int pos_add, int pos_div, int ring, int n_tok, int dim, int n_nope,
                              bool fp8, void* const* dst_rows = nullptr, bool f32_rows = false);
// The same FP8 round trip in f32, in place allowed: y[r, :n_nope] = E4M3(x[r, :n_nope]), the rest copied.
cudaError_t ds4_cuda_fp8_kv(cudaStream_t s, float* y, const float* x, int64_t n_rows, int dim, int n_nope);

// Router (MODEL.md 3.4): p = sqrt(softplus(logits[t])); ids[t] = the n_used experts of largest p + bias (ties to
// the lower index), or tid2eid[tokens[t]] when tid2eid is given (hash layers); weights[t, j] = p[ids[t, j]],
// divided by max(sum, 2^-14) when normalize, times scale. n_expert <= 256, n_used <= 16.
cudaError_t ds4_cuda_route(cudaStream_t s, int32_t* ids, float* weights, const float* logits, const float* bias,
                           const int32_t* tid2eid, const int32_t* tokens, int n_tok, int n_expert, int n_used,
                           float scale, bool normalize);

// X[t, i, :] = table[tokens[t]] for each of n_hc streams; table rows of n_embd F16/F32/BF16 values. With follow
// (or null): a token t with follow[t] >= 0 is the one the previous step sampled in row follow[t], read from the
// ids array whose address *prev holds (device memory: a replayed graph follows each step's own previous step),
// and written back to tokens[t] for the kernels after this one (a row the sampler left to the host, -1, reads
// token 0: the engine drops such a session's state).
cudaError_t ds4_cuda_embed(cudaStream_t s, float* X, const void* table, int type, int32_t* tokens, int n_tok,
                           int64_t n_embd, int n_hc, const int32_t* follow, const int64_t* prev);

// Sampling the next token of each row (MODEL.md 7, the rule of daemon/ds4d/sampling.py): draws[r] holds row r's
// knobs and its uniform, drawn on the host before the step (device memory, so a captured step samples with each
// replay's). Greedy rows take the largest logit (the lowest index on ties). Sampled rows: the candidates are the
// pool (the top_k largest logits, ties to the lower index, or all) not under the floor top + t_log_min_p (in
// float32), weighted exp((l - top) / temperature) in float64, in the pool's sorted order with top-k or top-p
// (else index order), cut at the first prefix reaching top_p of the pool's weight; the token is the first whose
// prefix reaches u times the kept weight. ids[r] = -1 for a skipped row, and where the host must sample instead:
// a logit that is not finite, or more than 4096 candidates to sort (top-p without top-k). top_k <= 1024.
// ids_host (or null): the ids written there too (pinned host memory's device address), so that no copy follows.
enum { DS4_DRAW_SAMPLE = 0, DS4_DRAW_GREEDY = 1, DS4_DRAW_SKIP = 2 };
typedef struct ds4_cuda_draw {
    double temperature;  // > 0 for sampled rows
    double top_p;        // (0, 1]; 1 = no cut
    double t_log_min_p;  // temperature * ln(min_p), -inf when min_p = 0
    double u;            // uniform in [0, 1)
    int32_t top_k;       // 0 = no top-k, else at most 1024
    int32_t mode;        // DS4_DRAW_*
} ds4_cuda_draw;
cudaError_t ds4_cuda_sample(cudaStream_t s, int32_t* ids, const ds4_cuda_draw* draws, const float* x,
                            int64_t x_stride, int n_rows, int n, int32_t* ids_host);
