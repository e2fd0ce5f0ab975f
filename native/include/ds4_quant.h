// Quantized block layouts and type codes shared by every backend.
//
// Weight blocks are the standard GGML layouts that ds4 GGUF files carry (MODEL.md §2.2), so a tensor's bytes
// are used in place, straight from the memory-mapped file. Activation blocks (ds4_act_*) are ours: they only
// live in scratch memory while a matrix product runs, and their exact numerics are specified here because the
// tests model them bit for bit in numpy.
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
