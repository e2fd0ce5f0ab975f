// Scalar decoding of the packed fields of the GGML blocks (ds4_quant.h), shared by the dequantizers and the
// integer kernels of every ISA level (native/cpu/isa/*.cpp).
#pragma once
#include <cstdint>

#include "ds4_quant.h"
#include "iq2xxs_tables.h"
#include "simd.h"

namespace ds4::cpu {

// Q4_K: the 12 scale bytes hold 8 six-bit scales and 8 six-bit mins. Sub-blocks 0-3 keep theirs in the low six
// bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take four bits from bytes 8-11 and their top two bits
// from the spare top bits of bytes 0-3 (scales) and 4-7 (mins). Returns the 8 values as the bytes of a u64.
inline void q4k_scales_mins(const uint8_t* s, uint64_t& scales, uint64_t& mins) {
    const uint32_t a = load_unaligned<uint32_t>(s), b = load_unaligned<uint32_t>(s + 4),
                   c = load_unaligned<uint32_t>(s + 8);
    const uint32_t sc_hi = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
    scales = (a & 0x3f3f3f3fu) | (uint64_t)sc_hi << 32;
    mins = (b & 0x3f3f3f3fu) | (uint64_t)mn_hi << 32;
}

// IQ2_XXS: one group of 32 weights is two u32: `grid` holds 4 grid indices (one byte each, 8 weights each);
// `aux` holds 4 seven-bit sign indices (bits 0-27) and the group scale (bits 28-31, used as 2 * s + 1).
// The 32 sign bits of the group, bit i set when weight i is negative.
inline uint32_t iq2xxs_sign_bits(uint32_t aux) {
    return (uint32_t)kIq2xxsSigns[aux & 127] | (uint32_t)kIq2xxsSigns[(aux >> 7) & 127] << 8 |
           (uint32_t)kIq2xxsSigns[(aux >> 14) & 127] << 16 | (uint32_t)kIq2xxsSigns[(aux >> 21) & 127] << 24;
}

}  // namespace ds4::cpu
