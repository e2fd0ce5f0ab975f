// The integer ("act8") matrix product for one ISA level: quantized weights times quantized activations
// (ds4_quant.h: Q8_0 activations for Q8_0 weights, Q8_K activations for Q2_K / Q4_K / IQ2_XXS).
//
// The result is defined exactly, so every level gives the same bits. Per weight block b of a row (32 weights for
// Q8_0, a 256 super-block otherwise) an exact integer part, then one float v_b, with dw = f16 d of the block,
// dmin = f16 dmin, dx = the activation block's d, and every float operation rounded on its own:
//   Q8_0:    isum = sum_i w_i * qx_i                                   v = (dw * dx) * isum
//   Q2_K:    16 sub-blocks j of 16: 2-bit q, scale sc_j = scales[j] & 15, min m_j = scales[j] >> 4
//            isum = sum_j sc_j * sum_{i in j} q_i * qx_i,  msum = sum_j m_j * bsums_j
//                                                                      v = (dw * dx) * isum - (dmin * dx) * msum
//   Q4_K:    8 sub-blocks of 32, 4-bit q, 6-bit (sc_j, m_j); isum and msum as for Q2_K (a sub-block of 32
//            takes two bsums), same v
//   IQ2_XXS: 8 groups of 32: scale ls = 2 * (aux >> 28) + 1, signed grid values gv (8, 25 or 43, signs from
//            ksigns); isum = sum_g ls_g * sum_{i in g} gv_i * qx_i     v = ((dw * dx) * isum) * 0.125f
// and y = ((0 + v_0) + v_1) + ... strictly in block order.
//
// The portable level is that definition, one output at a time. The SIMD form (AVX2; AVX-512 adds the VNNI dot
// instructions and mask registers on the same 256-bit layout) works on one weight row at a time, so that memory
// is read as one sequential stream (on this class of CPU, interleaving several rows' streams costs a quarter of
// the single-core bandwidth), for up to 4 or 8 tokens that share each unpacked weight. Eight consecutive blocks of
// the row are the 8 lanes: each block's integer partial sums land in an 8-lane vector, a transposing reduction
// turns the 8 blocks' vectors into one vector of their 8 exact sums, the float part runs over the lanes, and the
// 8 values are then added to y one by one, in block order. Latency is hidden by the independent tokens and by
// the next blocks' integer work, never by reassociating the sum.
#include <algorithm>

#include "blocks.h"
#include "kernels.h"

namespace ds4::cpu::DS4_ISA {
namespace {

// One token's quantized activations: the planes of ds4_quant.h.
struct ActRow {
    const float* d;
    const int8_t* qs;
    const int16_t* sums;
};

inline ActRow act_row(const MatmulJob& job, int64_t t) {
    const uint8_t* p = job.xq + t * job.xq_layout.bytes;
    return {(const float*)p, (const int8_t*)(p + job.xq_layout.qs_offset),
            (const int16_t*)(p + job.xq_layout.sums_offset)};
}

#if defined(DS4_ISA_portable)

// ---- reference form ------------------------------------------------------------------------------------------

float dot_q8_0(const uint8_t* w, const ActRow& x, int64_t nb) {
    float y = 0.0f;
    for (int64_t b = 0; b < nb; ++b, w += sizeof(BlockQ8_0)) {
        int32_t isum = 0;
        for (int i = 0; i < QK8_0; ++i) isum += (int8_t)w[2 + i] * x.qs[QK8_0 * b + i];
        const float dw = fp16_to_fp32(load_unaligned<uint16_t>(w));
        y = y + (dw * x.d[b]) * (float)isum;
    }
    return y;
}

float dot_q2_k(const uint8_t* w, const ActRow& x, int64_t nb) {
    float y = 0.0f;
    for (int64_t b = 0; b < nb; ++b, w += sizeof(BlockQ2_K)) {
        const uint8_t* sc = w;
        const uint8_t* qs = w + 16;
        const int8_t* qx = x.qs + QK_K * b;
        int32_t isum = 0, msum = 0;
        for (int j = 0; j < 16; ++j) {
            int32_t s = 0;
            for (int e = 16 * j; e < 16 * j + 16; ++e)
                s += ((qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3) * qx[e];
            isum += (sc[j] & 15) * s;
            msum += (sc[j] >> 4) * x.sums[16 * b + j];
        }
        const float dw = fp16_to_fp32(load_unaligned<uint16_t>(w + 80));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(w + 82));
        y = y + ((dw * x.d[b]) * (float)isum - (dmin * x.d[b]) * (float)msum);
    }
    return y;
}

float dot_q4_k(const uint8_t* w, const ActRow& x, int64_t nb) {
    float y = 0.0f;
    for (int64_t b = 0; b < nb; ++b, w += sizeof(BlockQ4_K)) {
        uint64_t scales, mins;
        q4k_scales_mins(w + 4, scales, mins);
        const uint8_t* qs = w + 16;
        const int8_t* qx = x.qs + QK_K * b;
        const int16_t* bsums = x.sums + 16 * b;
        int32_t isum = 0, msum = 0;
        for (int j = 0; j < 8; ++j) {
            int32_t s = 0;
            for (int i = 0; i < 32; ++i) s += ((qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 15) * qx[32 * j + i];
            isum += (int32_t)((scales >> (8 * j)) & 0xff) * s;
            msum += (int32_t)((mins >> (8 * j)) & 0xff) * (bsums[2 * j] + bsums[2 * j + 1]);
        }
        const float dw = fp16_to_fp32(load_unaligned<uint16_t>(w));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(w + 2));
        y = y + ((dw * x.d[b]) * (float)isum - (dmin * x.d[b]) * (float)msum);
    }
    return y;
}

float dot_iq2_xxs(const uint8_t* w, const ActRow& x, int64_t nb) {
    float y = 0.0f;
    for (int64_t b = 0; b < nb; ++b, w += sizeof(BlockIQ2_XXS)) {
        const int8_t* qx = x.qs + QK_K * b;
        int32_t isum = 0;
        for (int g = 0; g < 8; ++g) {
            const uint32_t grid = load_unaligned<uint32_t>(w + 2 + 8 * g);
            const uint32_t aux = load_unaligned<uint32_t>(w + 2 + 8 * g + 4);
            const uint32_t signs = iq2xxs_sign_bits(aux);
            int32_t s = 0;
            for (int i = 0; i < 32; ++i) {
                const int32_t mag = (int32_t)((kIq2xxsGrid[(grid >> (8 * (i / 8))) & 255] >> (8 * (i % 8))) & 0xff);
                s += ((signs >> i) & 1 ? -mag : mag) * qx[32 * g + i];
            }
            isum += (int32_t)(2 * (aux >> 28) + 1) * s;
        }
        const float dw = fp16_to_fp32(load_unaligned<uint16_t>(w));
        y = y + ((dw * x.d[b]) * (float)isum) * 0.125f;
    }
    return y;
}

template <float (*Dot)(const uint8_t*, const ActRow&, int64_t)>
void rows_act8(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const ActRow x = act_row(job, t);
        for (int64_t r = r0; r < r1; ++r)
            job.y[t * job.y_stride + r] = Dot(job.w + r * job.row_bytes, x, job.xq_layout.nb);
    }
}

}  // namespace

void matmul_act8(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    switch (job.type) {
        case TYPE_Q8_0: rows_act8<dot_q8_0>(job, r0, r1, t0, t1); break;
        case TYPE_Q2_K: rows_act8<dot_q2_k>(job, r0, r1, t0, t1); break;
        case TYPE_Q4_K: rows_act8<dot_q4_k>(job, r0, r1, t0, t1); break;
        case TYPE_IQ2_XXS: rows_act8<dot_iq2_xxs>(job, r0, r1, t0, t1); break;
        default: break;  // unreachable: the module only sends quantized types here
    }
}

#else

// ---- SIMD form: one row x up to 4 tokens, 8 consecutive blocks as the lanes -------------------------------------


inline __m256i loadu(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// acc + per int32 lane: the two int16 pair sums of u8 * s8 products, each times its int16 weight. The pair sums
// never saturate here (|u| <= 43 against |s| <= 127, or |u| <= 15).
inline __m256i dot_u8s8_w16(__m256i acc, __m256i u, __m256i s, __m256i w16) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
#if defined(DS4_ISA_avx512)
    return _mm256_dpwssd_epi32(acc, pairs, w16);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, w16));
#endif
}

// Eight vectors of 8 int32 partial sums (one per lane) -> one vector whose lane k is the total of v[k].
inline __m256i reduce_lanes(const __m256i* v) {
    auto pair = [](__m256i a, __m256i b) {  // [a0+a2, b0+b2, a1+a3, b1+b3 | the same over 4-7]
        return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    };
    auto quad = [](__m256i ab, __m256i cd) {  // [a, b, c, d over 0-3 | over 4-7]
        return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
    };
    const __m256i lo = quad(pair(v[0], v[1]), pair(v[2], v[3])), hi = quad(pair(v[4], v[5]), pair(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The f16 at byte `off` of 8 blocks `stride` bytes apart, as 8 floats.
inline __m256 f16x8(const uint8_t* w, int stride, int off) {
    alignas(16) uint16_t h[8];
    for (int k = 0; k < 8; ++k) h[k] = load_unaligned<uint16_t>(w + k * stride + off);
    return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)h));
}

// pshufb controls that spread scale bytes (broadcast to both 128-bit halves) over the int16 lanes.
struct ScaleSpread {
    uint8_t pairs[8][32];  // lanes 0-7 <- byte 2 i, lanes 8-15 <- byte 2 i + 1 (Q2_K: two sub-blocks of 16)
    uint8_t same[8][32];   // all 16 lanes <- byte j (Q4_K: one sub-block of 32)
    constexpr ScaleSpread() : pairs(), same() {
        for (int i = 0; i < 8; ++i)
            for (int b = 0; b < 32; b += 2) {
                pairs[i][b] = (uint8_t)(b < 16 ? 2 * i : 2 * i + 1);
                same[i][b] = (uint8_t)i;
                pairs[i][b + 1] = same[i][b + 1] = 0x80;  // high byte of the int16: zero
            }
    }
};
alignas(64) constexpr ScaleSpread kSpread;

// Each kernel: kTokens is how many tokens share one unpacking of the weights; dots() gives, for 8 consecutive
// weight blocks (lane k at w + k * kBlockBytes) and NT tokens (lane k's activations at q[t] + k * kBlockWeights,
// sums at s[t] + k * kSumsPerBlock), isum[t] and msum[t] with lane k for block k; value() is the float v of the
// header, lane-wise.

struct KernelQ8_0 {
    static constexpr int kBlockWeights = QK8_0, kBlockBytes = sizeof(BlockQ8_0), kSumsPerBlock = 1, kTokens = 4;
    static constexpr int kScaleOffset = 0;
    static constexpr bool kHasMin = false;

    template <int NT>
    static void dots(const uint8_t* w, const int8_t* const* q, const int16_t* const* s, __m256i* isum, __m256i*) {
        __m256i part[NT][8];
#if defined(DS4_ISA_avx512)
        // VNNI multiplies u8 by s8: feed w + 128 (w ^ 0x80), then take 128 * (the block's sum of qx) back out
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int k = 0; k < 8; ++k) {
            const __m256i u = _mm256_xor_si256(loadu(w + k * kBlockBytes + 2), flip);
            for (int t = 0; t < NT; ++t)
                part[t][k] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, loadu(q[t] + 32 * k));
        }
        for (int t = 0; t < NT; ++t) {
            const __m256i sums = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)s[t]));
            isum[t] = _mm256_sub_epi32(reduce_lanes(part[t]), _mm256_slli_epi32(sums, 7));
        }
#else
        (void)s;
        const __m256i ones = _mm256_set1_epi16(1);
        for (int k = 0; k < 8; ++k) {
            // u8 x s8 dot of signed bytes: |w| against x carrying w's sign (|-128| reads as 128 unsigned; the
            // int16 pair sums stay within 2 * 128 * 127)
            const __m256i v = loadu(w + k * kBlockBytes + 2), av = _mm256_sign_epi8(v, v);
            for (int t = 0; t < NT; ++t)
                part[t][k] =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(loadu(q[t] + 32 * k), v)), ones);
        }
        for (int t = 0; t < NT; ++t) isum[t] = reduce_lanes(part[t]);
#endif
    }
    static __m256 value(__m256 dw, __m256, __m256 dx, __m256i isum, __m256i) {
        return _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
    }
};

struct KernelQ2_K {
    static constexpr int kBlockWeights = QK_K, kBlockBytes = sizeof(BlockQ2_K), kSumsPerBlock = 16, kTokens = 4;
    static constexpr int kScaleOffset = 80;
    static constexpr bool kHasMin = true;

    template <int NT>
    static void dots(const uint8_t* w, const int8_t* const* q, const int16_t* const* s, __m256i* isum, __m256i* msum) {
        const __m256i m3 = _mm256_set1_epi8(3);
        const __m128i m4 = _mm_set1_epi8(15);
        __m256i ipart[NT][8], mpart[NT][8];
        for (int k = 0; k < 8; ++k) {
            const uint8_t* blk = w + k * kBlockBytes;
            const __m128i sm = _mm_loadu_si128((const __m128i*)blk);
            const __m256i scales = _mm256_broadcastsi128_si256(_mm_and_si128(sm, m4));
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), m4));
            __m256i acc[NT];
            for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
            for (int n = 0; n < 2; ++n) {
                const __m256i v = loadu(blk + 16 + 32 * n);
                for (int j = 0; j < 4; ++j) {
                    // weights 128 n + 32 j + [0, 32): sub-blocks 8 n + 2 j (low 16 bytes) and 8 n + 2 j + 1
                    const __m256i qv = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m3);
                    const __m256i sc = _mm256_shuffle_epi8(scales, loadu(kSpread.pairs[4 * n + j]));
                    for (int t = 0; t < NT; ++t)
                        acc[t] = dot_u8s8_w16(acc[t], qv, loadu(q[t] + QK_K * k + 128 * n + 32 * j), sc);
                }
            }
            for (int t = 0; t < NT; ++t) {
                ipart[t][k] = acc[t];
                mpart[t][k] = _mm256_madd_epi16(mins, loadu(s[t] + 16 * k));
            }
        }
        for (int t = 0; t < NT; ++t) {
            isum[t] = reduce_lanes(ipart[t]);
            msum[t] = reduce_lanes(mpart[t]);
        }
    }
    static __m256 value(__m256 dw, __m256 dmin, __m256 dx, __m256i isum, __m256i msum) {
        return _mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum)),
                             _mm256_mul_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(msum)));
    }
};

struct KernelQ4_K {
    static constexpr int kBlockWeights = QK_K, kBlockBytes = sizeof(BlockQ4_K), kSumsPerBlock = 16, kTokens = 4;
    static constexpr int kScaleOffset = 0;
    static constexpr bool kHasMin = true;

    template <int NT>
    static void dots(const uint8_t* w, const int8_t* const* q, const int16_t* const* s, __m256i* isum, __m256i* msum) {
        const __m256i m4 = _mm256_set1_epi8(15);
        __m256i ipart[NT][8], mpart[NT][8];
        for (int k = 0; k < 8; ++k) {
            const uint8_t* blk = w + k * kBlockBytes;
            uint64_t sc8, mn8;
            q4k_scales_mins(blk + 4, sc8, mn8);
            const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtsi64_si128((long long)sc8));
            const __m128i m = _mm_cvtsi64_si128((long long)mn8);
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));  // m_j for both bsums of sub-block j
            __m256i acc[NT];
            for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
            for (int c = 0; c < 4; ++c) {
                // qs[32 c ..]: low nibbles are sub-block 2 c, high nibbles sub-block 2 c + 1
                const __m256i v = loadu(blk + 16 + 32 * c);
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                const __m256i sc_lo = _mm256_shuffle_epi8(scales, loadu(kSpread.same[2 * c]));
                const __m256i sc_hi = _mm256_shuffle_epi8(scales, loadu(kSpread.same[2 * c + 1]));
                for (int t = 0; t < NT; ++t) {
                    acc[t] = dot_u8s8_w16(acc[t], lo, loadu(q[t] + QK_K * k + 64 * c), sc_lo);
                    acc[t] = dot_u8s8_w16(acc[t], hi, loadu(q[t] + QK_K * k + 64 * c + 32), sc_hi);
                }
            }
            for (int t = 0; t < NT; ++t) {
                ipart[t][k] = acc[t];
                mpart[t][k] = _mm256_madd_epi16(mins, loadu(s[t] + 16 * k));
            }
        }
        for (int t = 0; t < NT; ++t) {
            isum[t] = reduce_lanes(ipart[t]);
            msum[t] = reduce_lanes(mpart[t]);
        }
    }
    static __m256 value(__m256 dw, __m256 dmin, __m256 dx, __m256i isum, __m256i msum) {
        return KernelQ2_K::value(dw, dmin, dx, isum, msum);
    }
};

#if !defined(DS4_ISA_avx512)
// 7-bit sign index -> 8 bytes of +1 / -1 (for _mm256_sign_epi8), derived from kIq2xxsSigns.
struct SignBytes {
    uint64_t v[128];
    constexpr SignBytes() : v() {
        for (int s = 0; s < 128; ++s)
            for (int i = 0; i < 8; ++i) v[s] |= (uint64_t)((kIq2xxsSigns[s] >> i) & 1 ? 0xff : 0x01) << (8 * i);
    }
};
alignas(64) constexpr SignBytes kSignBytes;
#endif

struct KernelIQ2_XXS {
    // its weights cost the most to unpack (grid lookups, signs): 8 tokens share them where registers allow
    static constexpr int kBlockWeights = QK_K, kBlockBytes = sizeof(BlockIQ2_XXS), kSumsPerBlock = 16;
#if defined(DS4_ISA_avx512)
    static constexpr int kTokens = 8;
#else
    static constexpr int kTokens = 4;
#endif
    static constexpr int kScaleOffset = 0;
    static constexpr bool kHasMin = false;

    template <int NT>
    static void dots(const uint8_t* w, const int8_t* const* q, const int16_t* const*, __m256i* isum, __m256i*) {
        __m256i part[NT][8];
        for (int k = 0; k < 8; ++k) {
            const uint8_t* blk = w + k * kBlockBytes + 2;
            // the 8 group scales at once: qword g of the two halves holds (grid, aux) of groups g and 4 + g
            const __m256i hi4 = _mm256_or_si256(_mm256_srli_epi64(loadu(blk), 60),
                                                _mm256_slli_epi64(_mm256_srli_epi64(loadu(blk + 32), 60), 32));
            const __m256i ls1 = _mm256_add_epi32(_mm256_add_epi32(hi4, hi4), _mm256_set1_epi32(1));
            // ls in both int16 halves of dword 2 g (group g) and 2 g + 1 (group 4 + g)
            const __m256i ls_all = _mm256_or_si256(ls1, _mm256_slli_epi32(ls1, 16));
            __m256i acc[NT];
            for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_si256();
            for (int g = 0; g < 8; ++g) {
                const uint32_t grid = load_unaligned<uint32_t>(blk + 8 * g);
                const uint32_t aux = load_unaligned<uint32_t>(blk + 8 * g + 4);
                const __m256i mag =
                    _mm256_setr_epi64x((long long)kIq2xxsGrid[grid & 255], (long long)kIq2xxsGrid[(grid >> 8) & 255],
                                       (long long)kIq2xxsGrid[(grid >> 16) & 255], (long long)kIq2xxsGrid[grid >> 24]);
                const __m256i ls =
                    _mm256_permutevar8x32_epi32(ls_all, _mm256_set1_epi32(g < 4 ? 2 * g : 2 * (g - 4) + 1));
#if defined(DS4_ISA_avx512)
                // ksigns[s] is s with an even-parity bit 7: spread the four 7-bit indices over bytes and add it
                const uint32_t sb = _pdep_u32(aux, 0x7f7f7f7fu);
                uint32_t p = sb ^ (sb >> 4);
                p ^= p >> 2;
                p ^= p >> 1;
                const __mmask32 neg = sb | (p & 0x01010101u) << 7;
                for (int t = 0; t < NT; ++t) {
                    const __m256i qx = loadu(q[t] + QK_K * k + 32 * g);
                    acc[t] = dot_u8s8_w16(acc[t], mag, _mm256_mask_sub_epi8(qx, neg, _mm256_setzero_si256(), qx), ls);
                }
#else
                const __m256i sign = _mm256_setr_epi64x(
                    (long long)kSignBytes.v[aux & 127], (long long)kSignBytes.v[(aux >> 7) & 127],
                    (long long)kSignBytes.v[(aux >> 14) & 127], (long long)kSignBytes.v[(aux >> 21) & 127]);
                for (int t = 0; t < NT; ++t)
                    acc[t] = dot_u8s8_w16(acc[t], mag, _mm256_sign_epi8(loadu(q[t] + QK_K * k + 32 * g), sign), ls);
#endif
            }
            for (int t = 0; t < NT; ++t) part[t][k] = acc[t];
        }
        for (int t = 0; t < NT; ++t) isum[t] = reduce_lanes(part[t]);
    }
    static __m256 value(__m256 dw, __m256, __m256 dx, __m256i isum, __m256i) {
        return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum)), _mm256_set1_ps(0.125f));
    }
};

// Blocks [b, b + nl) of one row (nl <= 8 lanes; w -> block b) into y[t] for NT tokens.
template <class K, int NT>
inline void eight_blocks(const uint8_t* w, int64_t b, int nl, const ActRow* x, float* y) {
    const int8_t* q[NT];
    const int16_t* s[NT];
    for (int t = 0; t < NT; ++t) {
        q[t] = x[t].qs + b * K::kBlockWeights;
        s[t] = x[t].sums + b * K::kSumsPerBlock;
    }
    __m256i isum[NT], msum[NT];
    K::template dots<NT>(w, q, s, isum, msum);
    const __m256 dw = f16x8(w, K::kBlockBytes, K::kScaleOffset);
    const __m256 dmin = K::kHasMin ? f16x8(w, K::kBlockBytes, K::kScaleOffset + 2) : _mm256_setzero_ps();
    for (int t = 0; t < NT; ++t) {
        alignas(32) float v[8];
        _mm256_store_ps(v, K::value(dw, dmin, _mm256_loadu_ps(x[t].d + b), isum[t], msum[t]));
        for (int k = 0; k < nl; ++k) y[t] = y[t] + v[k];  // strictly in block order
    }
}

// Row r for tokens [t, t + NT).
template <class K, int NT>
void row_tokens(const MatmulJob& job, int64_t r, int64_t t) {
    const uint8_t* row = job.w + r * job.row_bytes;
    const int64_t nb = job.xq_layout.nb;
    ActRow x[NT];
    float y[NT];
    for (int k = 0; k < NT; ++k) {
        x[k] = act_row(job, t + k);
        y[k] = 0.0f;
    }
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        prefetch_ahead(row + b * K::kBlockBytes, 8 * K::kBlockBytes);
        eight_blocks<K, NT>(row + b * K::kBlockBytes, b, 8, x, y);
    }
    if (b < nb) {  // the last blocks, zero-padded to 8 lanes (the activation planes are padded too)
        alignas(32) uint8_t tail[8 * K::kBlockBytes] = {};
        std::copy_n(row + b * K::kBlockBytes, (nb - b) * K::kBlockBytes, tail);
        eight_blocks<K, NT>(tail, b, (int)(nb - b), x, y);
    }
    for (int k = 0; k < NT; ++k) job.y[(t + k) * job.y_stride + r] = y[k];
}

// Row r for nt <= K::kTokens tokens from t: the largest instantiated tile that fits.
template <class K, int NT = K::kTokens>
void row_tile(const MatmulJob& job, int64_t r, int64_t t, int nt) {
    if constexpr (NT > 1)
        if (nt < NT) return row_tile<K, NT - 1>(job, r, t, nt);
    row_tokens<K, NT>(job, r, t);
}

template <class K>
void rows_act8(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t t = t0; t < t1; t += K::kTokens)
            row_tile<K>(job, r, t, (int)std::min<int64_t>(K::kTokens, t1 - t));
}

}  // namespace

void matmul_act8(const MatmulJob& job, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    switch (job.type) {
        case TYPE_Q8_0: rows_act8<KernelQ8_0>(job, r0, r1, t0, t1); break;
        case TYPE_Q2_K: rows_act8<KernelQ2_K>(job, r0, r1, t0, t1); break;
        case TYPE_Q4_K: rows_act8<KernelQ4_K>(job, r0, r1, t0, t1); break;
        case TYPE_IQ2_XXS: rows_act8<KernelIQ2_XXS>(job, r0, r1, t0, t1); break;
        default: break;  // unreachable: the module only sends quantized types here
    }
}

#endif

}  // namespace ds4::cpu::DS4_ISA
