// ISA-independent part of the CPU kernels: validation, feature detection, packing, per-call
// preparation (Plan), work decomposition and thread dispatch. Compiled with baseline flags only.
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

bool valid_isa(Isa isa) {
  return isa == Isa::kScalar || isa == Isa::kAvx2 || isa == Isa::kAvx512 || isa == Isa::kNeon;
}
bool valid_layout(Layout l) { return l == Layout::kNCHW || l == Layout::kNHWC; }
bool valid_act(Activation a) {
  return a == Activation::kNone || a == Activation::kRelu || a == Activation::kRelu6 ||
         a == Activation::kHardswish || a == Activation::kSilu;
}

const char* layout_name(Layout l) { return l == Layout::kNHWC ? "NHWC" : "NCHW"; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Leading dimension (elements) of a scratch row of n elements: whole cache lines, and an odd
// number of them once rows are long, so that walking a column does not alias cache sets.
int64_t padded_ld(int64_t n, int64_t elem_size) {
  const int64_t line = 64 / elem_size;
  int64_t ld = round_up(std::max<int64_t>(n, 1), line);
  if (ld / line >= 4 && (ld / line) % 2 == 0) ld += line;
  return ld;
}

// Thread-local scratch of the calling thread: reused across calls, so steady-state calls do not
// allocate. Each calling thread has its own, so concurrent calls never share scratch.
struct ScratchBuf {
  void* p = nullptr;
  std::size_t size = 0;
  ~ScratchBuf() { aligned_free_bytes(p); }
  void* get(std::size_t bytes) {
    if (bytes > size) {
      aligned_free_bytes(p);
      p = nullptr;
      size = 0;
      p = aligned_alloc_bytes(bytes);
      size = bytes;
    }
    return p;
  }
};

thread_local ScratchBuf t_scratch;

// Runs items [0, n_items) (the shared-depthwise phase's when `depthwise`, else the work items) on
// up to `tasks` tasks, task t using scratch + stride * t. Items are claimed one at a time
// (work_sharing.h); a task's consecutive items of one tile reuse its depthwise output, so each
// task remembers which tile its scratch holds.
template <typename T>
void dispatch(const Plan<T>& plan, const IsaOps<T>* ops, bool depthwise, int64_t n_items,
              char* scratch, std::size_t stride, int tasks) {
  struct alignas(64) CachedTile {
    int64_t id = -1;
  };
  tasks = tasks_for(n_items, 1, tasks);
  CachedTile few[8];  // no allocation for the usual thread counts
  std::unique_ptr<CachedTile[]> many(tasks > 8 ? new CachedTile[tasks] : nullptr);
  CachedTile* cached = many ? many.get() : few;
  share_work(n_items, 1, tasks, [&](int task, int64_t begin, int64_t end) {
    void* own = scratch + stride * task;
    if (depthwise) {
      ops->run_depthwise(plan, begin, end, own);
    } else {
      ops->run_items(plan, begin, end, own, &cached[task].id);
    }
  });
}

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
  return *packed;
}

template <typename T>
void check_tensors(const JointTensors<T>& t) {
  if (t.x == nullptr) throw std::invalid_argument("joint_forward: x is null");
  if (t.dw_weight == nullptr) throw std::invalid_argument("joint_forward: dw_weight is null");
  if (t.y == nullptr) throw std::invalid_argument("joint_forward: y is null");
}

std::size_t aligned_bytes(int64_t bytes) {
  return static_cast<std::size_t>(round_up(bytes, static_cast<int64_t>(kScratchAlign)));
}

// Planning: the Plan's geometry, tensors and work decomposition for tiling `tl`.
template <typename T>
Plan<T> plan_call(const JointGeometry& g, const JointTensors<T>& t, const PackedImpl<T>& packed,
                  const Tiling& tl) {
  Plan<T> plan;
  plan.C = g.in_channels;
  plan.H = g.in_h;
  plan.W = g.in_w;
  plan.CO = g.out_channels;
  plan.OH = g.out_h;
  plan.OW = g.out_w;
  plan.KH = g.kernel_h;
  plan.KW = g.kernel_w;
  plan.stride_h = g.stride_h;
  plan.stride_w = g.stride_w;
  plan.pad_h = g.pad_h;
  plan.pad_w = g.pad_w;
  plan.dil_h = g.dil_h;
  plan.dil_w = g.dil_w;
  plan.layout = g.layout;
  plan.x = t.x;
  plan.x_end = t.x + g.batch * g.in_channels * g.in_h * g.in_w;
  plan.residual = t.residual;
  plan.y = t.y;
  plan.mid_act = t.mid_act;
  plan.out_act = t.out_act;
  plan.packed = &packed;
  plan.tile_px = tl.tile_px;
  plan.n_tiles = tl.n_tiles;
  plan.co_chunk = tl.co_chunk;
  plan.n_co = tl.n_co;
  plan.n_items = g.batch * tl.n_tiles * tl.n_co;
  plan.stats = t.y_sum != nullptr;
  return plan;
}

// Scratch layout of one worker (Plan's per-worker scratch comment): the depthwise tile (unless
// shared-depthwise mode keeps the tiles in a shared buffer), NCHW's rows, plane and segments, and
// the statistics. Sets the offsets, ldt, the plane's geometry and scratch_bytes.
template <typename T>
void lay_out_worker_scratch(Plan<T>& plan, const JointGeometry& g, const Tiling& tl,
                            const IsaOps<T>& ops) {
  const int64_t C = g.in_channels;
  const bool nhwc = g.layout == Layout::kNHWC;
  if (nhwc) {
    plan.ldt = padded_ld(C, sizeof(T));
    plan.tile_elems = tl.tile_px * plan.ldt;
  } else {
    plan.tile_elems = ceil_div(tl.tile_px, ops.nr) * C * ops.nr;
  }
  const std::size_t own_tile_bytes =
      tl.shared_dw ? 0 : aligned_bytes(plan.tile_elems * int64_t(sizeof(T)));
  if (nhwc) {
    plan.scratch_bytes = own_tile_bytes;
  } else {
    const int64_t nr = ops.nr;
    plan.row_offset = own_tile_bytes;
    // Row slack of one micro-tile: the depthwise writes whole vectors past a segment's end.
    plan.ldt = round_up(tl.tile_px, nr) + nr;
    plan.row_stride = static_cast<int64_t>(aligned_bytes(plan.ldt * int64_t(sizeof(T))) / sizeof(T));
    plan.plane_offset = plan.row_offset + 2 * plan.row_stride * sizeof(T);  // two rows
    plan.scratch_bytes = plan.plane_offset;
    const int64_t S = g.stride_w;
    const int64_t qmax = (g.kernel_w - 1) * g.dil_w / S;
    // + vw - 1: each phase starts up to vw - 1 elements in, so its first inside element (where
    // the fill's stores begin) is vector-aligned.
    plan.lp = round_up(g.out_w + ops.vw + qmax + 1 + ops.vw - 1, ops.vw);
    const int64_t rows_out = std::min(g.out_h, ceil_div(tl.tile_px, g.out_w) + 1);
    plan.plane_rows = (rows_out - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h + 1;
    const int64_t plane_elems = plan.plane_rows * S * plan.lp + ops.vw;  // + store slack
    plan.use_plane = plane_elems <= plane_limit_elems();
    if (plan.use_plane) {
      plan.plane_stride =
          static_cast<int64_t>(aligned_bytes(plane_elems * int64_t(sizeof(T))) / sizeof(T));
      plan.max_segs = rows_out;
      plan.seg_offset = plan.scratch_bytes + 2 * plan.plane_stride * sizeof(T);  // two planes
      plan.scratch_bytes = plan.seg_offset + aligned_bytes(rows_out * 3 * int64_t(sizeof(int64_t)));
    }
  }
  if (plan.stats) {
    plan.stats_offset = plan.scratch_bytes;
    plan.scratch_bytes += aligned_bytes(2 * g.out_channels * int64_t(sizeof(double)));
  }
}

// Shared-depthwise mode's first phase: about four depthwise items per worker, in whole cache lines
// of channels (NHWC tiles hold channels along rows: two workers must not write one line). Sets
// dw_chunk and n_dw_chunks; returns the number of depthwise items.
template <typename T>
int64_t plan_shared_depthwise(Plan<T>& plan, int64_t batch, int threads) {
  const int64_t tiles_all = batch * plan.n_tiles;
  const int64_t line = 64 / int64_t(sizeof(T));
  plan.dw_chunk = round_up(ceil_div(plan.C, ceil_div(4 * int64_t(threads), tiles_all)), line);
  plan.n_dw_chunks = ceil_div(plan.C, plan.dw_chunk);
  return tiles_all * plan.n_dw_chunks;
}

// The per-call tables, in the head of the calling thread's scratch: folded depthwise weights and
// shift, pointwise scale and shift, the border tables, the plane's phase and tap tables, and in
// shared-depthwise mode the shared tiles (`shared_bytes`). Returns where the per-task scratch
// (plan.scratch_bytes per task) begins.
template <typename T>
char* set_up_call(Plan<T>& plan, const JointGeometry& g, const JointTensors<T>& t,
                  const IsaOps<T>& ops, std::size_t shared_bytes, int tasks) {
  const int64_t C = g.in_channels, CO = g.out_channels;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  const int64_t OH = g.out_h, OW = g.out_w;
  const bool nhwc = g.layout == Layout::kNHWC;
  auto bytes_of = [](int64_t n, std::size_t es) { return aligned_bytes(n * int64_t(es)); };
  const std::size_t b_dw = bytes_of(C * taps, sizeof(T));
  const std::size_t b_c = bytes_of(C, sizeof(T));
  const std::size_t b_co = bytes_of(CO, sizeof(T));
  const std::size_t b_oh = bytes_of(OH, sizeof(int64_t));
  const std::size_t b_ow = bytes_of(OW, sizeof(int64_t));
  const std::size_t b_kw = bytes_of(taps, sizeof(int64_t));
  const std::size_t b_ph = bytes_of(plan.use_plane ? g.stride_w : 0, sizeof(int64_t));
  const std::size_t head =
      b_dw + b_c + 2 * b_co + 2 * b_oh + 2 * b_ow + b_kw + 3 * b_ph + shared_bytes;
  char* cur = static_cast<char*>(t_scratch.get(head + plan.scratch_bytes * tasks));
  auto take = [&cur](std::size_t b) {
    char* p = cur;
    cur += b;
    return p;
  };
  T* dw_w = reinterpret_cast<T*>(take(b_dw));
  T* dw_b = reinterpret_cast<T*>(take(b_c));
  T* sc = reinterpret_cast<T*>(take(b_co));
  T* sh = reinterpret_cast<T*>(take(b_co));
  int64_t* ky_lo = reinterpret_cast<int64_t*>(take(b_oh));
  int64_t* ky_hi = reinterpret_cast<int64_t*>(take(b_oh));
  int64_t* kx_lo = reinterpret_cast<int64_t*>(take(b_ow));
  int64_t* kx_hi = reinterpret_cast<int64_t*>(take(b_ow));
  int64_t* tap_off = reinterpret_cast<int64_t*>(take(b_kw));
  int64_t* phase_lo = reinterpret_cast<int64_t*>(take(b_ph));
  int64_t* phase_hi = reinterpret_cast<int64_t*>(take(b_ph));
  int64_t* phase_off = reinterpret_cast<int64_t*>(take(b_ph));
  if (shared_bytes) plan.shared_dw = reinterpret_cast<T*>(take(shared_bytes));

  for (int64_t c = 0; c < C; ++c) {
    const T s = t.dw_scale ? t.dw_scale[c] : T(1);
    bool nan_weight = false;
    for (int64_t k = 0; k < taps; ++k) {
      const T w = t.dw_weight[c * taps + k] * s;
      nan_weight |= w != w;
      if (nhwc) {
        dw_w[k * C + c] = w;
      } else {
        dw_w[c * taps + k] = w;
      }
    }
    // Zero padding multiplies its taps by the weights, and NaN * 0 is NaN, so a NaN weight makes
    // every output of its channel NaN. Kernels that skip the padded taps (NHWC, and NCHW rows
    // outside the padded plane) would leave border outputs finite: the shift carries the NaN there.
    dw_b[c] = nan_weight ? std::numeric_limits<T>::quiet_NaN() : t.dw_shift ? t.dw_shift[c] : T(0);
  }
  for (int64_t o = 0; o < CO; ++o) {
    sc[o] = t.pw_scale ? t.pw_scale[o] : T(1);
    sh[o] = t.pw_shift ? t.pw_shift[o] : T(0);
  }
  for (int64_t oy = 0; oy < OH; ++oy) {
    taps_inside(oy, g.stride_h, g.pad_h, g.dil_h, KH, g.in_h, &ky_lo[oy], &ky_hi[oy]);
  }
  int64_t in_lo = OW, in_hi = OW;
  for (int64_t ox = 0; ox < OW; ++ox) {
    taps_inside(ox, g.stride_w, g.pad_w, g.dil_w, KW, g.in_w, &kx_lo[ox], &kx_hi[ox]);
    const bool inside = kx_lo[ox] == 0 && kx_hi[ox] == KW;
    if (inside && in_lo == OW) in_lo = ox;
    if (inside) in_hi = ox + 1;
  }
  if (in_lo == OW) in_hi = OW;
  plan.dw_w = dw_w;
  plan.dw_b = dw_b;
  plan.pw_scale = sc;
  plan.pw_shift = sh;
  plan.ky_lo = ky_lo;
  plan.ky_hi = ky_hi;
  plan.kx_lo = kx_lo;
  plan.kx_hi = kx_hi;
  plan.ox_in_lo = in_lo;
  plan.ox_in_hi = in_hi;
  if (plan.use_plane) {
    const int64_t S = g.stride_w, P = g.pad_w, Win = g.in_w;
    const int64_t cap = plan.lp - (ops.vw - 1);  // room left after the largest shift
    for (int64_t r = 0; r < S; ++r) {
      int64_t lo = P - r <= 0 ? 0 : ceil_div(P - r, S);
      int64_t hi = Win - 1 + P - r < 0 ? 0 : (Win - 1 + P - r) / S + 1;
      lo = std::min(lo, cap);
      hi = std::min(hi, cap);
      phase_lo[r] = lo;
      phase_hi[r] = std::max(lo, hi);
      phase_off[r] = r * plan.lp + (ops.vw - lo % ops.vw) % ops.vw;
    }
    for (int64_t ky = 0; ky < KH; ++ky) {
      for (int64_t kx = 0; kx < KW; ++kx) {
        const int64_t j = kx * g.dil_w;
        tap_off[ky * KW + kx] = ky * g.dil_h * S * plan.lp + phase_off[j % S] + j / S;
      }
    }
  }
  plan.tap_off = tap_off;
  plan.phase_lo = phase_lo;
  plan.phase_hi = phase_hi;
  plan.phase_off = phase_off;
  return cur;
}

// Dispatch: the shared-depthwise phase (when planned), the work items, then the workers'
// statistics added into y_sum/y_sumsq.
template <typename T>
void run_call(const Plan<T>& plan, const IsaOps<T>* ops, int64_t n_dw_items, char* task_scratch,
              int tasks, const JointTensors<T>& t) {
  const int64_t CO = plan.CO;
  auto worker_stats = [&](int task) {
    return reinterpret_cast<double*>(task_scratch + plan.scratch_bytes * task + plan.stats_offset);
  };
  if (plan.stats) {
    for (int i = 0; i < tasks; ++i) std::fill(worker_stats(i), worker_stats(i) + 2 * CO, 0.0);
  }
  if (plan.shared_dw) {
    dispatch(plan, ops, true, n_dw_items, task_scratch, plan.scratch_bytes, tasks);
  }
  dispatch(plan, ops, false, plan.n_items, task_scratch, plan.scratch_bytes, tasks);
  if (plan.stats) {
    for (int i = 0; i < tasks; ++i) {
      const double* w = worker_stats(i);
      for (int64_t o = 0; o < CO; ++o) {
        t.y_sum[o] += w[o];
        t.y_sumsq[o] += w[CO + o];
      }
    }
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
  const TileShape ts{nhwc ? ops->mr : ops->nr, ops->vw, packed.panel(), !nhwc};
  const Tiling tl = choose_tiling(g, sizeof(T), ts, threads);

  Plan<T> plan = plan_call(g, t, packed, tl);
  lay_out_worker_scratch(plan, g, tl, *ops);
  std::size_t shared_bytes = 0;
  int64_t n_dw_items = 0;
  if (tl.shared_dw) {
    n_dw_items = plan_shared_depthwise(plan, g.batch, threads);
    shared_bytes = aligned_bytes(g.batch * plan.n_tiles * plan.tile_elems * int64_t(sizeof(T)));
  }
  const int tasks =
      static_cast<int>(std::min<int64_t>(threads, std::max(plan.n_items, n_dw_items)));
  char* task_scratch = set_up_call(plan, g, t, *ops, shared_bytes, tasks);
  run_call(plan, ops, n_dw_items, task_scratch, tasks, t);
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
