// The per-call machinery of the fused forward ops (forward_call.h).
#include "forward_call.h"

#include <algorithm>
#include <limits>
#include <memory>
#include <numeric>

#include "conv_geometry.h"
#include "work_sharing.h"

namespace lwk {
namespace detail {

namespace {


// Leading dimension (elements) of a scratch row of n elements: whole cache lines, and an odd
// number of them once rows are long, so that walking a column does not alias cache sets.
int64_t padded_ld(int64_t n, int64_t elem_size) {
  const int64_t line = 64 / elem_size;
  int64_t ld = round_up(std::max<int64_t>(n, 1), line);
  if (ld / line >= 4 && (ld / line) % 2 == 0) ld += line;
  return ld;
}

// The calling thread's scratch for the plan's tables and the workers' buffers.
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

}  // namespace

// The folded depthwise weights, in the layout's order ([C][taps] NCHW, [taps][C] NHWC), by
// blocks of 16 channels: NHWC's reads of a block stay in L1 while its writes run along channels,
// and the NaN flags are kept per lane so that the loops vectorise (a channel at a time, with a
// running flag, took ~20 us per call for 1152 channels of 5x5 before the workers started).
// Zero padding multiplies its taps by the weights, and NaN * 0 is NaN, so a NaN weight makes
// every output of its channel NaN. Kernels that skip the padded taps (NHWC, and NCHW rows outside
// the padded plane) would leave border outputs finite: the shift carries the NaN there.
template <typename T>
void fold_depthwise_into(bool nhwc, int64_t C, int64_t taps, const T* weight, const T* scale,
                         const T* shift, T* dw_w, T* dw_b) {
  constexpr int64_t kFoldBlock = 16;
  for (int64_t c0 = 0; c0 < C; c0 += kFoldBlock) {
    const int64_t n = std::min(kFoldBlock, C - c0);
    T s[kFoldBlock];
    int nan[kFoldBlock] = {};
    for (int64_t i = 0; i < n; ++i) s[i] = scale ? scale[c0 + i] : T(1);
    const T* w = weight + c0 * taps;
    if (nhwc) {
      for (int64_t k = 0; k < taps; ++k) {
        T* out = dw_w + k * C + c0;
        for (int64_t i = 0; i < n; ++i) {
          const T v = w[i * taps + k] * s[i];
          out[i] = v;
          nan[i] |= v != v;
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        T* out = dw_w + (c0 + i) * taps;
        int any = 0;
        for (int64_t k = 0; k < taps; ++k) {
          const T v = w[i * taps + k] * s[i];
          out[k] = v;
          any |= v != v;
        }
        nan[i] = any;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      dw_b[c0 + i] = nan[i] ? std::numeric_limits<T>::quiet_NaN() : shift ? shift[c0 + i] : T(0);
    }
  }
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
  plan.x_row0 = 0;
  plan.x_rows = g.in_h;
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
  plan.y_transposed = t.y_transposed;
  // Inside a model the output buffer was last written a call or two before and, past ~1 MiB, has
  // left L2: MobileNetV1 at batch 1, 2 threads, its 32 -> 64 (3.2 MB out) and 64 -> 128 s2 (1.6
  // MB) blocks in the native sequence 0.292 -> 0.264 and 0.238 -> 0.222 ms (an 8 MiB gate against
  // this one, three alternating processes). Only a benchmark that repeats one call back to back
  // finds such an output still cached: there the prefetch cost batch 1 3-6%.
  constexpr int64_t kPrefetchOutputBytes = int64_t(1) << 20;
  plan.prefetch_output = g.layout == Layout::kNHWC && !t.y_transposed &&
                         g.batch * g.out_h * g.out_w * g.out_channels * int64_t(sizeof(T)) >
                             kPrefetchOutputBytes;
  return plan;
}

// Scratch layout of one worker (Plan's per-worker scratch comment): the depthwise tile (unless
// shared-depthwise mode keeps the tiles in a shared buffer), NCHW's rows, plane and job lists, and
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
    // Row slack of one micro-tile: the depthwise writes whole vectors past a row's end.
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
      // One fill job per row and phase, one depthwise job per output vector of each row.
      plan.max_fill_jobs = plan.plane_rows * S;
      plan.max_dw_jobs = rows_out * ceil_div(g.out_w, ops.vw);
      plan.job_offset = plan.scratch_bytes + 2 * plan.plane_stride * sizeof(T);  // two planes
      plan.scratch_bytes =
          plan.job_offset + aligned_bytes((plan.max_fill_jobs * 3 + plan.max_dw_jobs * 2) *
                                          int64_t(sizeof(int64_t)));
    }
  }
  if (plan.stats) {
    plan.stats_offset = plan.scratch_bytes;
    plan.scratch_bytes += aligned_bytes(2 * g.out_channels * int64_t(sizeof(double)));
  }
  if (plan.y_transposed) {  // NCHW: rows for every output channel (the kernels index them by co)
    plan.out_offset = plan.scratch_bytes;
    plan.ldo = nhwc ? padded_ld(g.out_channels, sizeof(T)) : padded_ld(tl.tile_px, sizeof(T));
    const int64_t rows = nhwc ? tl.tile_px : g.out_channels;
    plan.scratch_bytes += aligned_bytes(rows * plan.ldo * int64_t(sizeof(T)));
  }
}

namespace {

// Shared-depthwise mode's first phase: chunks of channels in whole cache lines (NHWC tiles hold
// channels along rows: two workers must not write one line) and multiples of chunk_multiple, for
// `units` tiles or images. The chunk size whose busiest worker (contiguous runs of items, as
// share_work hands them out) has the fewest channels to do; of equals, the one nearest four items
// per worker (room to take over a late worker's items). 960 channels in 48-channel steps went
// 7 x 144 (four chunks for one worker, three for the other); 10 x 96 splits evenly. Sets dw_chunk
// and n_dw_chunks; returns the number of depthwise items.
template <typename T>
int64_t plan_shared_depthwise(Plan<T>& plan, int64_t units, int threads, int64_t chunk_multiple) {
  const int64_t line = 64 / int64_t(sizeof(T));
  const int64_t unit = std::lcm(line, std::max<int64_t>(1, chunk_multiple));
  const int64_t C = plan.C, steps = ceil_div(C, unit), t = std::max(1, threads);
  const int64_t target = ceil_div(4 * t, units);  // chunks per unit for about four items per worker
  int64_t best_chunk = 0, best_distance = 0;
  double best_load = 0;
  for (int64_t k = 1; k <= steps; ++k) {
    const int64_t chunk = ceil_div(steps, k) * unit, n = ceil_div(C, chunk);
    if (n != k) continue;  // (another k gives the same chunks)
    const int64_t last = C - (n - 1) * chunk;
    const double load = busiest_share(units * n, static_cast<int>(t), n, double(chunk), double(last));
    const int64_t distance = n > target ? n - target : target - n;
    if (best_chunk == 0 || load < best_load || (load == best_load && distance < best_distance)) {
      best_chunk = chunk;
      best_load = load;
      best_distance = distance;
    }
  }
  plan.dw_chunk = best_chunk;
  plan.n_dw_chunks = ceil_div(C, best_chunk);
  return units * plan.n_dw_chunks;
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

  if (t.dw_folded) {  // folded by the caller (JointTensors::dw_folded)
    plan.dw_w = t.dw_weight;
    plan.dw_b = t.dw_shift;
  } else {
    fold_depthwise_into(nhwc, C, taps, t.dw_weight, t.dw_scale, t.dw_shift, dw_w, dw_b);
    plan.dw_w = dw_w;
    plan.dw_b = dw_b;
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

}  // namespace

template <typename T>
void execute_call(Plan<T>& plan, const JointGeometry& g, const JointTensors<T>& t, const IsaOps<T>* ops,
                  int threads, bool shared_dw, int64_t dw_units, int64_t chunk_multiple) {
  std::size_t shared_bytes = 0;
  int64_t n_dw_items = 0;
  if (shared_dw) {
    n_dw_items = plan_shared_depthwise(plan, dw_units, threads, chunk_multiple);
    shared_bytes = aligned_bytes(g.batch * plan.n_tiles * plan.tile_elems * int64_t(sizeof(T)));
  }
  const int tasks =
      static_cast<int>(std::min<int64_t>(threads, std::max(plan.n_items, n_dw_items)));
  char* task_scratch = set_up_call(plan, g, t, *ops, shared_bytes, tasks);
  run_call(plan, ops, n_dw_items, task_scratch, tasks, t);
}

#define LWK_INSTANTIATE_FORWARD_CALL(T)                                                          \
  template Plan<T> plan_call<T>(const JointGeometry&, const JointTensors<T>&,                   \
                                const PackedImpl<T>&, const Tiling&);                            \
  template void lay_out_worker_scratch<T>(Plan<T>&, const JointGeometry&, const Tiling&,        \
                                          const IsaOps<T>&);                                     \
  template void execute_call<T>(Plan<T>&, const JointGeometry&, const JointTensors<T>&,         \
                                const IsaOps<T>*, int, bool, int64_t, int64_t);                   \
  template void fold_depthwise_into<T>(bool, int64_t, int64_t, const T*, const T*, const T*, T*, T*);
LWK_INSTANTIATE_FORWARD_CALL(float)
LWK_INSTANTIATE_FORWARD_CALL(double)
#undef LWK_INSTANTIATE_FORWARD_CALL

}  // namespace detail
}  // namespace lwk
