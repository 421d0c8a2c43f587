// ISA-independent part of the CPU kernels: validation, feature detection, packing, and the joint
// forward call (its checks and tiling; forward_call.cpp plans and dispatches it). Compiled with
// baseline flags only.
#include "joint_block.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "conv_geometry.h"
#include "forward_call.h"
#include "internal.h"
#include "tiling.h"
#include "work_sharing.h"

namespace lwk {
namespace detail {

void* aligned_alloc_bytes(std::size_t bytes) {
  if (bytes == 0) bytes = kScratchAlign;
  void* p = ::operator new(bytes, std::align_val_t(kScratchAlign));
  return p;
}

void aligned_free_bytes(void* p) noexcept {
  if (p) ::operator delete(p, std::align_val_t(kScratchAlign));
}

template <typename T>
PackedImpl<T>::PackedImpl(Isa isa, Layout layout, int64_t c_out, int64_t c_in, int panel)
    : isa_(isa), layout_(layout), c_out_(c_out), c_in_(c_in), panel_(panel) {
  // + one panel row of slack: the thin NCHW micro-kernel loads whole vectors from a panel row.
  const std::size_t n = static_cast<std::size_t>(num_panels() * c_in_ * panel_ + 64);
  data_ = static_cast<T*>(aligned_alloc_bytes(n * sizeof(T)));
  for (std::size_t i = static_cast<std::size_t>(num_panels() * c_in_ * panel_); i < n; ++i) {
    data_[i] = T(0);
  }
}

template <typename T>
PackedImpl<T>::~PackedImpl() {
  aligned_free_bytes(data_);
}

template class PackedImpl<float>;
template class PackedImpl<double>;

namespace {
std::atomic<std::size_t> g_tile_budget{0};
std::atomic<int64_t> g_plane_limit{-1};
std::atomic<int> g_shared_dw{-1};
}  // namespace

void set_plane_limit_elems(int64_t elems) { g_plane_limit.store(elems); }
int64_t plane_limit_elems() {
  const int64_t v = g_plane_limit.load();
  return v >= 0 ? v : (int64_t(1) << 16);
}

void set_shared_depthwise(int mode) { g_shared_dw.store(mode); }
int shared_depthwise() { return g_shared_dw.load(); }

void set_tile_budget_bytes(std::size_t bytes) { g_tile_budget.store(bytes); }
std::size_t tile_budget_bytes() {
  const std::size_t b = g_tile_budget.load();
  return b ? b : std::size_t(256) * 1024;
}

// Dispatch tables.
template <>
const IsaOps<float>* ops_for<float>(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return scalar_ops_f32();
#if defined(LWK_HAVE_AVX2)
    case Isa::kAvx2:
      return avx2_ops_f32();
#endif
#if defined(LWK_HAVE_AVX512)
    case Isa::kAvx512:
      return avx512_ops_f32();
#endif
#if defined(LWK_HAVE_NEON)
    case Isa::kNeon:
      return neon_ops_f32();
#endif
    default:
      return nullptr;
  }
}

template <>
const IsaOps<double>* ops_for<double>(Isa) {
  return scalar_ops_f64();  // double always runs the scalar path
}

namespace {

// Copies panels [p_lo, p_hi) of `weight` into their packed layout.
template <typename T>
void pack_panels(const T* weight, int64_t c_out, int64_t c_in, int panel, int64_t p_lo, int64_t p_hi,
                 T* dst) {
  // A blocked transpose: each weight row is read contiguously kBlock elements at a time while
  // the panel rows it lands in (kBlock * panel elements) stay in L1. Walking all `panel` rows at
  // once instead reads `panel` streams a row (often 4 KiB) apart, which alias in L1 and made
  // packing wide NHWC panels about twice as slow. Training packs every step.
  constexpr int64_t kBlock = 64;
  for (int64_t p = p_lo; p < p_hi; ++p) {
    T* panel_dst = dst + p * c_in * panel;
    for (int64_t k0 = 0; k0 < c_in; k0 += kBlock) {
      const int64_t k1 = std::min(c_in, k0 + kBlock);
      for (int j = 0; j < panel; ++j) {
        const int64_t co = p * panel + j;
        T* d = panel_dst + j;
        if (co < c_out) {
          const T* src = weight + co * c_in;
          for (int64_t k = k0; k < k1; ++k) d[k * panel] = src[k];
        } else {
          for (int64_t k = k0; k < k1; ++k) d[k * panel] = T(0);
        }
      }
    }
  }
}

template <typename T>
std::shared_ptr<const PackedPointwise<T>> pack_impl(Isa isa, Layout layout, const T* weight,
                                                    int64_t c_out, int64_t c_in, int num_threads) {
  if (!valid_isa(isa)) throw std::invalid_argument("pack_pointwise: unknown ISA value");
  if (!valid_layout(layout)) throw std::invalid_argument("pack_pointwise: unknown layout value");
  if (!isa_supported(isa)) {
    throw std::invalid_argument(std::string("pack_pointwise: the '") + isa_name(isa) +
                                "' path is not supported by this build or this CPU");
  }
  if (c_out < 1 || c_in < 1) {
    throw std::invalid_argument("pack_pointwise: out_channels and in_channels must be >= 1, got " +
                                std::to_string(c_out) + " and " + std::to_string(c_in));
  }
  if (c_out > (int64_t(1) << 31) || c_in > (int64_t(1) << 31)) {
    throw std::invalid_argument("pack_pointwise: channel count too large");
  }
  if (weight == nullptr) throw std::invalid_argument("pack_pointwise: weight is null");
  const IsaOps<T>* ops = ops_for<T>(isa);
  if (ops == nullptr) throw std::invalid_argument("pack_pointwise: no kernel for this ISA");
  const int panel = layout == Layout::kNHWC ? ops->nr : ops->mr;
  auto packed = std::make_shared<PackedImpl<T>>(ops->isa, layout, c_out, c_in, panel);
  T* dst = packed->mutable_data();
  const int64_t np = packed->num_panels();
  // Threads share panels in chunks of ~64K elements; small weights are packed on this thread.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 16) / (c_in * panel));
  share_work(np, chunk, num_threads, [&](int, int64_t p_lo, int64_t p_hi) {
    pack_panels(weight, c_out, c_in, panel, p_lo, p_hi, dst);
  });
  return packed;
}

// ---------------------------------------------------------------------------------------------
// The forward call, in the order it runs: checks, planning (tiling and the Plan's geometry),
// the per-worker scratch layout, the per-call tables, then the dispatch.

// What validate() cannot see: the packing must match the geometry and come from pack_pointwise,
// the activations and the statistics buffers must be valid. Returns the packed weights.
template <typename T>
const PackedImpl<T>& check_call(const PackedPointwise<T>& packed_base, const JointGeometry& g,
                                const JointTensors<T>& t) {
  const std::string err = validate(g);
  if (!err.empty()) throw std::invalid_argument("joint_forward: " + err);
  const auto* packed = dynamic_cast<const PackedImpl<T>*>(&packed_base);
  if (packed == nullptr) {
    throw std::invalid_argument("joint_forward: packed weights must come from pack_pointwise");
  }
  if (packed->layout() != g.layout) {
    throw std::invalid_argument(std::string("joint_forward: weights were packed for layout ") +
                                layout_name(packed->layout()) + " but the geometry says " +
                                layout_name(g.layout));
  }
  if (packed->in_channels() != g.in_channels || packed->out_channels() != g.out_channels) {
    throw std::invalid_argument(
        "joint_forward: weights were packed for " + std::to_string(packed->out_channels()) +
        " x " + std::to_string(packed->in_channels()) + " (out x in) channels but the geometry has " +
        std::to_string(g.out_channels) + " x " + std::to_string(g.in_channels));
  }
  if (!valid_act(t.mid_act)) throw std::invalid_argument("joint_forward: unknown mid_act value");
  if (!valid_act(t.out_act)) throw std::invalid_argument("joint_forward: unknown out_act value");
  if (ops_for<T>(packed->isa()) == nullptr || !isa_supported(packed->isa())) {
    throw std::invalid_argument("joint_forward: the packed weights' ISA is not supported here");
  }
  if ((t.y_sum == nullptr) != (t.y_sumsq == nullptr)) {
    throw std::invalid_argument("joint_forward: y_sum and y_sumsq must be given together");
  }
  if (t.y_transposed && (t.residual != nullptr || t.y_sum != nullptr)) {
    throw std::invalid_argument("joint_forward: y_transposed takes neither a residual nor statistics");
  }
  return *packed;
}

template <typename T>
void check_tensors(const JointTensors<T>& t) {
  if (t.x == nullptr) throw std::invalid_argument("joint_forward: x is null");
  if (t.dw_weight == nullptr) throw std::invalid_argument("joint_forward: dw_weight is null");
  if (t.y == nullptr) throw std::invalid_argument("joint_forward: y is null");
  if (t.dw_folded && t.dw_shift == nullptr) {
    throw std::invalid_argument("joint_forward: folded depthwise weights need their folded shift");
  }
}

template <typename T>
void forward_impl(const PackedPointwise<T>& packed_base, const JointGeometry& g,
                  const JointTensors<T>& t, int num_threads) {
  const PackedImpl<T>& packed = check_call(packed_base, g, t);
  if (t.y_sum != nullptr) {
    std::fill(t.y_sum, t.y_sum + g.out_channels, 0.0);
    std::fill(t.y_sumsq, t.y_sumsq + g.out_channels, 0.0);
  }
  if (g.batch == 0) return;
  check_tensors(t);

  const IsaOps<T>* ops = ops_for<T>(packed.isa());
  const bool nhwc = g.layout == Layout::kNHWC;
  const int threads = std::max(1, num_threads);
  const TileShape ts{nhwc ? ops->mr : ops->nr, ops->vw, packed.panel(), !nhwc,
                     t.y_transposed ? g.out_channels : 0};
  const Tiling tl = choose_tiling(g, sizeof(T), ts, threads);

  Plan<T> plan = plan_call(g, t, packed, tl);
  lay_out_worker_scratch(plan, g, tl, *ops);
  execute_call(plan, g, t, ops, threads, tl.shared_dw, g.batch * plan.n_tiles, 1);
}

}  // namespace
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API.

std::string validate(const JointGeometry& g) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (g.in_channels < 1) return "in_channels must be >= 1, got " + s(g.in_channels);
  if (g.out_channels < 1) return "out_channels must be >= 1, got " + s(g.out_channels);
  if (g.out_channels > detail::kConvDimMax) return "a size, stride, padding or dilation exceeds 2^30";
  std::string msg = detail::validate_conv(detail::conv_shape_of(g, g.layout));
  if (!msg.empty()) return msg;
  if (!detail::fits_int64_index({g.batch, g.out_channels, g.out_h, g.out_w})) {
    return "tensor sizes overflow 64-bit indexing";
  }
  return msg;
}

template <typename T>
std::shared_ptr<const PackedPointwise<T>> pack_pointwise(Isa isa, Layout layout, const T* weight,
                                                         int64_t c_out, int64_t c_in, int num_threads) {
  return detail::pack_impl<T>(isa, layout, weight, c_out, c_in, num_threads);
}

template <typename T>
void joint_forward(const PackedPointwise<T>& packed, const JointGeometry& g,
                   const JointTensors<T>& t, int num_threads) {
  detail::forward_impl<T>(packed, g, t, num_threads);
}

template <typename T>
void fold_depthwise(Layout layout, int64_t channels, int64_t taps, const T* weight, const T* scale,
                    const T* shift, T* folded_weight, T* folded_shift) {
  if (channels < 0 || taps < 1) throw std::invalid_argument("fold_depthwise: needs channels >= 0 and taps >= 1");
  if (channels > 0 && (weight == nullptr || folded_weight == nullptr || folded_shift == nullptr)) {
    throw std::invalid_argument("fold_depthwise: weight and both outputs must not be null");
  }
  detail::fold_depthwise_into(layout == Layout::kNHWC, channels, taps, weight, scale, shift, folded_weight,
                              folded_shift);
}

template void fold_depthwise<float>(Layout, int64_t, int64_t, const float*, const float*, const float*,
                                    float*, float*);
template void fold_depthwise<double>(Layout, int64_t, int64_t, const double*, const double*,
                                     const double*, double*, double*);

template std::shared_ptr<const PackedPointwise<float>> pack_pointwise<float>(Isa, Layout,
                                                                             const float*, int64_t,
                                                                             int64_t, int);
template std::shared_ptr<const PackedPointwise<double>> pack_pointwise<double>(Isa, Layout,
                                                                               const double*,
                                                                               int64_t, int64_t, int);
template void joint_forward<float>(const PackedPointwise<float>&, const JointGeometry&,
                                   const JointTensors<float>&, int);
template void joint_forward<double>(const PackedPointwise<double>&, const JointGeometry&,
                                    const JointTensors<double>&, int);

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
#if defined(LWK_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    {
      static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
      }();
      return ok;
    }
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(LWK_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    {
      // The compiler runtime's check covers the OS side too (the ZMM state enabled in XCR0).
      static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
      }();
      return ok;
    }
#else
      return false;
#endif
    case Isa::kNeon:
#if defined(LWK_HAVE_NEON)
      return true;  // Advanced SIMD is part of the aarch64 baseline
#else
      return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  if (isa_supported(Isa::kNeon)) return Isa::kNeon;
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kNeon:
      return "neon";
  }
  return "unknown";
}

}  // namespace lwk
