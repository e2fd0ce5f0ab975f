// Weight rows -> float32, for one ISA level: every type the engine reads (F32, F16, BF16, Q8_0, Q2_K, Q4_K,
// IQ2_XXS), bit for bit equal to gguf.quants.dequantize.
//
// Exactness is what makes this easy to get right at every level: each weight is an f16 scale times a small
// integer (times a second f16 scale and small integer, minus a min), and every product involved fits the 24-bit
// float mantissa, so only the final subtraction of the K types rounds, once, as in numpy. The order of the
// operations below is gguf's (d * sc, then * q, then - dmin * m), which also fixes the sign of zero results.
// Used by ds4d._cpu.dequantize and by the f32-activation product (matmul_f32.cpp), which dequantizes tiles.
#include <cstring>

#include "blocks.h"
#include "kernels.h"

namespace ds4::cpu::DS4_ISA {
namespace {

#if defined(DS4_ISA_portable)

// ---- reference form: one weight at a time ------------------------------------------------------------------

void rows_f16(float* y, const uint8_t* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(load_unaligned<uint16_t>(p + 2 * i));
}

void rows_bf16(float* y, const uint8_t* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(load_unaligned<uint16_t>(p + 2 * i));
}

void blocks_q8_0(float* y, const uint8_t* blk, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ8_0), y += QK8_0) {
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk));
        for (int i = 0; i < QK8_0; ++i) y[i] = (float)(int8_t)blk[2 + i] * d;
    }
}

// Q2_K: weight e = 128 n + 32 k + l (n < 2, k < 4, l < 32) is bits 2k..2k+1 of qs[32 n + l]; sub-block e / 16.
void blocks_q2_k(float* y, const uint8_t* blk, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ2_K), y += QK_K) {
        const uint8_t* sc = blk;
        const uint8_t* qs = blk + 16;
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk + 80));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(blk + 82));
        for (int e = 0; e < QK_K; ++e) {
            const int n = e / 128, k = (e / 32) % 4, l = e % 32, j = e / 16;
            const float dl = d * (float)(sc[j] & 15), ml = dmin * (float)(sc[j] >> 4);
            y[e] = dl * (float)((qs[32 * n + l] >> (2 * k)) & 3) - ml;
        }
    }
}

// Q4_K: weight e = 64 c + 32 h + l is the low (h = 0) or high (h = 1) nibble of qs[32 c + l]; sub-block e / 32.
void blocks_q4_k(float* y, const uint8_t* blk, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ4_K), y += QK_K) {
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(blk + 2));
        uint64_t scales, mins;
        q4k_scales_mins(blk + 4, scales, mins);
        const uint8_t* qs = blk + 16;
        for (int e = 0; e < QK_K; ++e) {
            const int c = e / 64, h = (e / 32) % 2, l = e % 32, j = e / 32;
            const float dl = d * (float)((scales >> (8 * j)) & 0xff), ml = dmin * (float)((mins >> (8 * j)) & 0xff);
            y[e] = dl * (float)((qs[32 * c + l] >> (4 * h)) & 15) - ml;
        }
    }
}

void blocks_iq2_xxs(float* y, const uint8_t* blk, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockIQ2_XXS)) {
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk));
        for (int g = 0; g < 8; ++g, y += 32) {
            const uint32_t grid = load_unaligned<uint32_t>(blk + 2 + 8 * g);
            const uint32_t aux = load_unaligned<uint32_t>(blk + 2 + 8 * g + 4);
            const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
            const uint32_t signs = iq2xxs_sign_bits(aux);
            for (int i = 0; i < 32; ++i) {
                const uint8_t mag = (uint8_t)(kIq2xxsGrid[(grid >> (8 * (i / 8))) & 255] >> (8 * (i % 8)));
                y[i] = db * (float)mag * ((signs >> i) & 1 ? -1.0f : 1.0f);
            }
        }
    }
}

#else

// ---- AVX2 form, also used at the AVX-512 level (stores bound it; wider vectors buy nothing) ------------------

inline __m256 u8x8_to_f32(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// 32 small unsigned values (one per byte) -> y[0..32): the first 16 with (dl0, ml0), the last 16 with (dl1, ml1).
inline void store_scaled32(float* y, __m256i q, __m256 dl0, __m256 ml0, __m256 dl1, __m256 ml1) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(y + 0, _mm256_sub_ps(_mm256_mul_ps(dl0, u8x8_to_f32(lo)), ml0));
    _mm256_storeu_ps(y + 8, _mm256_sub_ps(_mm256_mul_ps(dl0, u8x8_to_f32(_mm_srli_si128(lo, 8))), ml0));
    _mm256_storeu_ps(y + 16, _mm256_sub_ps(_mm256_mul_ps(dl1, u8x8_to_f32(hi)), ml1));
    _mm256_storeu_ps(y + 24, _mm256_sub_ps(_mm256_mul_ps(dl1, u8x8_to_f32(_mm_srli_si128(hi, 8))), ml1));
}

void rows_f16(float* y, const uint8_t* p, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 2 * i))));
    for (; i < n; ++i) y[i] = fp16_to_fp32(load_unaligned<uint16_t>(p + 2 * i));
}

void rows_bf16(float* y, const uint8_t* p, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 2 * i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
    for (; i < n; ++i) y[i] = bf16_to_fp32(load_unaligned<uint16_t>(p + 2 * i));
}

void blocks_q8_0(float* y, const uint8_t* blk, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ8_0), y += QK8_0) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(load_unaligned<uint16_t>(blk)));
        for (int i = 0; i < QK8_0; i += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 2 + i)));
            _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }
}

void blocks_q2_k(float* y, const uint8_t* blk, int64_t nb) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ2_K), y += QK_K) {
        const uint8_t* sc = blk;
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk + 80));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(blk + 82));
        for (int n = 0; n < 2; ++n) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * n));
            for (int k = 0; k < 4; ++k) {
                const __m256i q = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * k)), m3);
                const int j = 8 * n + 2 * k;  // the 32 weights are sub-blocks j and j + 1
                store_scaled32(y + 128 * n + 32 * k, q, _mm256_set1_ps(d * (float)(sc[j] & 15)),
                               _mm256_set1_ps(dmin * (float)(sc[j] >> 4)), _mm256_set1_ps(d * (float)(sc[j + 1] & 15)),
                               _mm256_set1_ps(dmin * (float)(sc[j + 1] >> 4)));
            }
        }
    }
}

void blocks_q4_k(float* y, const uint8_t* blk, int64_t nb) {
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockQ4_K), y += QK_K) {
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk));
        const float dmin = fp16_to_fp32(load_unaligned<uint16_t>(blk + 2));
        uint64_t scales, mins;
        q4k_scales_mins(blk + 4, scales, mins);
        for (int c = 0; c < 4; ++c) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * c));
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * c + h;
                const __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m4);
                const __m256 dl = _mm256_set1_ps(d * (float)((scales >> (8 * j)) & 0xff));
                const __m256 ml = _mm256_set1_ps(dmin * (float)((mins >> (8 * j)) & 0xff));
                store_scaled32(y + 32 * j, q, dl, ml, dl, ml);
            }
        }
    }
}

void blocks_iq2_xxs(float* y, const uint8_t* blk, int64_t nb) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    for (int64_t b = 0; b < nb; ++b, blk += sizeof(BlockIQ2_XXS)) {
        const float d = fp16_to_fp32(load_unaligned<uint16_t>(blk));
        for (int g = 0; g < 8; ++g) {
            const uint32_t grid = load_unaligned<uint32_t>(blk + 2 + 8 * g);
            const uint32_t aux = load_unaligned<uint32_t>(blk + 2 + 8 * g + 4);
            const __m256 db = _mm256_set1_ps(d * (0.5f + (float)(aux >> 28)) * 0.25f);
            const uint32_t signs = iq2xxs_sign_bits(aux);
            for (int k = 0; k < 4; ++k, y += 8) {
                const __m256 mag = u8x8_to_f32(_mm_loadl_epi64((const __m128i*)&kIq2xxsGrid[(grid >> (8 * k)) & 255]));
                const __m256i set = _mm256_and_si256(_mm256_set1_epi32((int)((signs >> (8 * k)) & 255)), bit);
                const __m256i neg = _mm256_and_si256(_mm256_cmpeq_epi32(set, bit), sign);
                _mm256_storeu_ps(y, _mm256_xor_ps(_mm256_mul_ps(db, mag), _mm256_castsi256_ps(neg)));
            }
        }
    }
}

#endif

}  // namespace

void dequantize_blocks(float* out, const uint8_t* row, int type, int64_t b0, int64_t nb) {
    switch (type) {
        case TYPE_F32: std::memcpy(out, row + 4 * b0, 4 * nb); break;
        case TYPE_F16: rows_f16(out, row + 2 * b0, nb); break;
        case TYPE_BF16: rows_bf16(out, row + 2 * b0, nb); break;
        case TYPE_Q8_0: blocks_q8_0(out, row + sizeof(BlockQ8_0) * b0, nb); break;
        case TYPE_Q2_K: blocks_q2_k(out, row + sizeof(BlockQ2_K) * b0, nb); break;
        case TYPE_Q4_K: blocks_q4_k(out, row + sizeof(BlockQ4_K) * b0, nb); break;
        case TYPE_IQ2_XXS: blocks_iq2_xxs(out, row + sizeof(BlockIQ2_XXS) * b0, nb); break;
        default: break;  // unreachable: the module validates the type
    }
}

void dequantize(float* out, const uint8_t* w, int type, size_t row_bytes, int64_t cols, int64_t r0, int64_t r1) {
    const int64_t nb = cols / block_weights(type);
    for (int64_t r = r0; r < r1; ++r) dequantize_blocks(out + r * cols, w + r * row_bytes, type, 0, nb);
}

}  // namespace ds4::cpu::DS4_ISA
