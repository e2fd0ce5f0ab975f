// This ISA level's kernel table, the one symbol the module looks up (see kernels.h).
#include "kernels.h"

#define DS4_STR_(x) #x
#define DS4_STR(x) DS4_STR_(x)

namespace ds4::cpu::DS4_ISA {

extern const IsaKernels kernels;
const IsaKernels kernels = {DS4_STR(DS4_ISA), dequantize, matmul_f32, matmul_act8, swiglu, attention,
                             indexer_scores};

}  // namespace ds4::cpu::DS4_ISA
