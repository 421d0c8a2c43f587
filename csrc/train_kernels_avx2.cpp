// The training kernels (train_impl.h) compiled with -mavx2 -mfma (x86-64 only); entered only after
// isa_supported(Isa::kAvx2) confirmed the CPU has both.
#define LWK_TRAIN_NS avx2
#include "train_impl.h"

namespace lwk {
namespace train {

const TrainOps<float>* avx2_train_ops_f32() { return avx2::ops_table<float>(); }

}  // namespace train
}  // namespace lwk
