// Quantized block layouts and type codes shared by every backend.
//
// Weight blocks are the standard GGML layouts that ds4 GGUF files carry (MODEL.md §2.2), so a tensor's bytes
// are used in place, straight from the memory-mapped file. Quantized activations (ActRowLayout) are ours: they
// only live in scratch memory while a matrix product runs, and their exact numerics are specified here because
// the tests model them bit for bit in numpy.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ds4 {

// GGML type codes (the values stored in GGUF tensor infos).
enum Type : int {
    TYPE_F32 = 0,
    TYPE_F16 = 1,
    TYPE_Q8_0 = 8,
    TYPE_Q2_K = 10,
    TYPE_Q4_K = 12,
    TYPE_IQ2_XXS = 16,
    TYPE_BF16 = 30,
};

constexpr int QK8_0 = 32;   // weights per Q8_0 block
constexpr int QK_K = 256;   // weights per K / IQ super-block

#pragma pack(push, 1)
struct BlockQ8_0 {          // 34 bytes / 32 weights: w = d * qs[i]
    uint16_t d;             // f16
    int8_t qs[QK8_0];
};
struct BlockQ2_K {          // 84 bytes / 256 weights: 16 sub-blocks of 16
    uint8_t scales[QK_K / 16];  // low nibble: scale, high nibble: min (4 bits each)
    uint8_t qs[QK_K / 4];       // 2-bit quants, 4 per byte (see the dequantizer for the order)
    uint16_t d;                 // f16 super-scale of the scales
    uint16_t dmin;              // f16 super-scale of the mins
};
struct BlockQ4_K {          // 144 bytes / 256 weights: 8 sub-blocks of 32
    uint16_t d;                 // f16
    uint16_t dmin;              // f16
    uint8_t scales[12];         // 6-bit scales and mins, packed
    uint8_t qs[QK_K / 2];       // 4-bit quants
};
struct BlockIQ2_XXS {       // 66 bytes / 256 weights: 8 groups of 32, each 4 grid points of 8 + signs + scale
    uint16_t d;                 // f16
    uint16_t qs[QK_K / 8];
};
#pragma pack(pop)
static_assert(sizeof(BlockQ8_0) == 34, "block_q8_0 layout");
static_assert(sizeof(BlockQ2_K) == 84, "block_q2_K layout");
static_assert(sizeof(BlockQ4_K) == 144, "block_q4_K layout");
static_assert(sizeof(BlockIQ2_XXS) == 66, "block_iq2_xxs layout");

// Activations of the integer ("act8") matrix product. A row of x is quantized once per product and every weight
// row then takes exact integer dot products with it.
//
// Q8_0 activations (for Q8_0 weights), per 32 values: amax = max|x|; d = amax / 127.0f; id = d != 0 ? 1.0f / d : 0;
// qs[i] = clamp(round_half_even(x[i] * id), -127, 127).
//
// Q8_K activations (for Q2_K, Q4_K and IQ2_XXS weights), per 256 values: m = the value of largest |x| (the first
// one on ties, with its sign); if m == 0 then d = 0 and qs = 0, else iscale = -127.0f / m,
// qs[i] = min(127, round_half_even(iscale * x[i])), d = 1.0f / iscale; bsums[j] = the sum of qs over the j-th 16.
// (|iscale * x[i]| <= 127 up to rounding, so qs stays in [-127, 127]: m itself lands on -127.)
//
// Every product is then, per weight block b (32 or 256 weights), an exact integer sum turned into one float v_b,
// and y = ((0 + v_0) + v_1) + ... in float32 strictly in block order; the per-type v_b is spelled out beside the
// kernels (native/cpu/isa/matmul_act8.cpp).
//
// A quantized row is kept as planes (ours, scratch memory only), so that the scales and sums of 8 consecutive
// blocks are one vector load: float d[nb8]; int8_t qs[nb8 * block]; int16_t sums[] where nb8 is the block count
// rounded up to 8 (the padding zeroed) and sums holds, for Q8_0 activations, the sum of each block's qs (nb8 of
// them), for Q8_K activations the bsums (nb8 * 16).
struct ActRowLayout {
    int64_t nb;         // blocks per row
    size_t qs_offset;   // bytes from the row start; d is at offset 0
    size_t sums_offset;
    size_t bytes;       // per row, a multiple of 64
};

inline ActRowLayout act_row_layout(int64_t cols, int block) {
    auto up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
    ActRowLayout l;
    l.nb = cols / block;
    const int64_t nb8 = up(l.nb, 8);
    l.qs_offset = (size_t)(4 * nb8);
    l.sums_offset = l.qs_offset + (size_t)(nb8 * block);
    l.bytes = (size_t)up((int64_t)l.sums_offset + 2 * nb8 * (block == QK8_0 ? 1 : 16), 64);
    return l;
}

// Weights per block and bytes per block of each type; 0 for an unknown type.
inline int block_weights(int type) {
    switch (type) {
        case TYPE_F32: case TYPE_F16: case TYPE_BF16: return 1;
        case TYPE_Q8_0: return QK8_0;
        case TYPE_Q2_K: case TYPE_Q4_K: case TYPE_IQ2_XXS: return QK_K;
        default: return 0;
    }
}
inline int block_bytes(int type) {
    switch (type) {
        case TYPE_F32: return 4;
        case TYPE_F16: case TYPE_BF16: return 2;
        case TYPE_Q8_0: return sizeof(BlockQ8_0);
        case TYPE_Q2_K: return sizeof(BlockQ2_K);
        case TYPE_Q4_K: return sizeof(BlockQ4_K);
        case TYPE_IQ2_XXS: return sizeof(BlockIQ2_XXS);
        default: return 0;
    }
}
// Bytes of one row of `cols` weights (cols must be a multiple of block_weights(type)).
inline size_t row_bytes(int type, int64_t cols) {
    return (size_t)(cols / block_weights(type)) * (size_t)block_bytes(type);
}

}  // namespace ds4
