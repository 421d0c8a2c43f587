// Internal interface between the ISA-independent driver (joint_block.cpp) and the per-ISA
// translation units (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp,
// isa_neon.cpp). Not part of the public API.
//
// Split of responsibilities:
//   joint_block.cpp  validation, CPU feature detection, weight packing (a pure layout transform),
//                    the forward call's checks and tiling (tiling.cpp's cost model);
//   forward_call.cpp planning a call (Plan), the per-worker scratch layout, the per-call tables
//                    (folded depthwise weights, border tables) and the thread dispatch, shared by
//                    every fused forward op;
//   kernel_work_items.h  the fused tile computation (depthwise tile -> register-blocked GEMM ->
//                    epilogue), written once as templates over a small vector-traits struct
//                    (kernel_common.h) and instantiated in each ISA translation unit with that
//                    unit's compiler flags: kernel_depthwise_nchw.h and kernel_depthwise_nhwc.h
//                    compute a tile's depthwise output, kernel_gemm.h its pointwise GEMM and
//                    epilogue.
#pragma once

#include <cstddef>
#include <cstdint>

#include "joint_block.h"

namespace lwk {
namespace detail {

constexpr std::size_t kScratchAlign = 64;

// 64-byte aligned allocation; throws std::bad_alloc.
void* aligned_alloc_bytes(std::size_t bytes);
void aligned_free_bytes(void* p) noexcept;

// A calling thread's scratch, reused across calls (kept in a thread_local): steady-state calls do
// not allocate, and concurrent calls never share it. get() keeps the contents only while the size
// does not grow.
struct ScratchBuf {
  void* p = nullptr;
  std::size_t size = 0;
  ScratchBuf() = default;
  ScratchBuf(const ScratchBuf&) = delete;
  ScratchBuf& operator=(const ScratchBuf&) = delete;
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

// Pointwise weights packed as panels of `panel()` output channels: panel p holds
// W[p*panel + j][k] at data()[(p * in_channels + k) * panel + j], zero for channels past c_out,
// followed by 64 zero elements of slack (whole-vector loads from the last panel row).
// NHWC packs panels of the micro-kernel's column count (output channels run along vectors);
// NCHW packs panels of its row count (output channels are broadcast rows).
template <typename T>
class PackedImpl final : public PackedPointwise<T> {
 public:
  PackedImpl(Isa isa, Layout layout, int64_t c_out, int64_t c_in, int panel);
  ~PackedImpl() override;
  PackedImpl(const PackedImpl&) = delete;
  PackedImpl& operator=(const PackedImpl&) = delete;

  Isa isa() const override { return isa_; }
  Layout layout() const override { return layout_; }
  int64_t out_channels() const override { return c_out_; }
  int64_t in_channels() const override { return c_in_; }

  int panel() const { return panel_; }
  int64_t num_panels() const { return (c_out_ + panel_ - 1) / panel_; }
  const T* data() const { return data_; }
  T* mutable_data() { return data_; }

 private:
  Isa isa_;
  Layout layout_;
  int64_t c_out_, c_in_;
  int panel_;
  T* data_ = nullptr;
};

// The expand step of an inverted residual (inverted_residual.h), which produces the depthwise
// input of a Plan tile by tile: for the input rows [iy_a, iy_b) a tile reads and its channels
// [c_lo, c_hi), band = act(scale * (W_expand . x) + shift) in the plan's layout (NCHW [C][rows][W],
// NHWC [rows][W][C]), computed by the pointwise micro-kernels with W_expand packed like a
// pointwise weight (NCHW: panels of MR expanded channels broadcast over pixel columns, the input
// pixels first copied into [C_in][NR] blocks at pack_offset; NHWC: panels of NR expanded channels,
// the input read in place). Rows outside the image are the depthwise's zero padding and are never
// computed. The band never leaves the worker's cache-sized scratch: the expanded tensor is never
// written whole.
template <typename T>
struct ExpandStage {
  const T* x = nullptr;  // the block input, [N][C_in][H][W] in the plan's layout
  int64_t in_channels = 0;
  const PackedImpl<T>* packed = nullptr;  // [C][C_in]
  const T* scale = nullptr;               // [C]
  const T* shift = nullptr;               // [C]
  Activation act = Activation::kNone;
  // Shared-depthwise mode's first phase by whole images: item = n * n_dw_chunks + chunk expands
  // the chunk's channels of all of image n once and runs every tile's depthwise from it.
  bool whole_images = false;
  std::size_t band_offset = 0, pack_offset = 0;  // in the worker's scratch
  int64_t band_elems = 0;                 // band capacity (elements, with vector slack)
};

// Everything one fused call needs, prepared once per call by the driver. All pointers are valid
// for the duration of the call; per-ISA code only reads it.
template <typename T>
struct Plan {
  // Geometry.
  int64_t C = 0, H = 0, W = 0, CO = 0, OH = 0, OW = 0;
  int64_t KH = 0, KW = 0, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  Layout layout = Layout::kNCHW;

  // Tensors. The depthwise input x holds rows x_row0 .. x_row0 + x_rows - 1 of each image (the
  // whole image, 0 .. H-1, for a joint block; an inverted residual's work item points x at the
  // band of expanded rows its tile reads, see ExpandStage): NCHW channel c of image n starts at
  // x + x_channel(n, c), NHWC image n at x + x_image(n), and row iy lies (iy - x_row0) rows on.
  const T* x = nullptr;
  int64_t x_row0 = 0, x_rows = 0;
  const T* residual = nullptr;  // may be null
  T* y = nullptr;
  const T* dw_w = nullptr;      // dw_scale folded in; NCHW: [C][KH*KW], NHWC: [KH*KW][C]
  const T* dw_b = nullptr;      // [C] (dw_shift or 0)
  const T* pw_scale = nullptr;  // [CO] (pw_scale or 1)
  const T* pw_shift = nullptr;  // [CO] (pw_shift or 0)
  Activation mid_act = Activation::kNone;
  Activation out_act = Activation::kNone;
  const PackedImpl<T>* packed = nullptr;

  // Border tables: for output row oy the taps ky in [ky_lo[oy], ky_hi[oy]) read inside the image
  // (similarly kx for output column ox). Columns in [ox_in_lo, ox_in_hi) have every kx inside.
  const int64_t* ky_lo = nullptr;
  const int64_t* ky_hi = nullptr;
  const int64_t* kx_lo = nullptr;
  const int64_t* kx_hi = nullptr;
  int64_t ox_in_lo = 0, ox_in_hi = 0;

  // NCHW depthwise through a zero-padded, stride-deinterleaved copy of the input rows a tile needs
  // (the "plane"): padded row j = x[iy][j - pad_w] (0 outside the image, and whole zero rows for
  // iy outside it), split into stride_w phases, phase r holding padded elements r, r + stride_w,
  // r + 2*stride_w, ... from phase_off[r] on (the phases of one row lie in stride_w*lp elements;
  // phase_off[r] = r*lp plus a shift that puts the phase's first inside element on a vector
  // boundary: the fill's stores then never split a cache line). Tap (ky, kx) of output (oy, ox)
  // then reads plane element (oy*stride_h - pad_h - iy_base) * stride_w*lp + tap_off[ky*KW + kx]
  // + ox, where iy_base is the tile's first plane row: unit-stride vector loads, no border cases,
  // no branches. plane_rows bounds the rows of one tile. When the plane would be too large (huge
  // padding or dilation) use_plane is false and the direct path (border columns scalar) runs
  // instead.
  bool use_plane = false;
  int64_t lp = 0, plane_rows = 0;
  const int64_t* tap_off = nullptr;  // [KH*KW]
  // Phase r's elements inside the image: [phase_lo[r], phase_hi[r])
  // (0 <= m*stride_w + r - pad_w < W).
  const int64_t* phase_lo = nullptr;  // [stride_w]
  const int64_t* phase_hi = nullptr;  // [stride_w]
  const int64_t* phase_off = nullptr;  // [stride_w]
  // A tile's job lists (kernel_depthwise_nchw.h: at most max_fill_jobs FillJobs, then at most
  // max_dw_jobs DwJobs), made once per tile at job_offset.
  int64_t max_fill_jobs = 0, max_dw_jobs = 0;
  std::size_t job_offset = 0;
  const T* x_end = nullptr;  // one past the last element of x (vector reads never reach it)

  // Work decomposition: item = (n * n_tiles + tile) * n_co + co_block. A tile is tile_px
  // consecutive output pixels (raster order) of one image; a co block is co_chunk output channels
  // (a multiple of the packed panel width).
  int64_t tile_px = 0, n_tiles = 0, co_chunk = 0, n_co = 0, n_items = 0;
  // Shared-depthwise mode (shared_dw not null): when a few tiles are split across workers by
  // output channels, each worker would redo the whole tile's depthwise. Instead a first phase
  // computes every tile's depthwise output once, split by input channels (item = (n * n_tiles +
  // tile) * n_dw_chunks + chunk of dw_chunk channels), into shared_dw + (n * n_tiles + tile) *
  // tile_elems, and the work items then only run the pointwise side from there.
  T* shared_dw = nullptr;
  int64_t tile_elems = 0, dw_chunk = 0, n_dw_chunks = 0;
  // Per-worker scratch. NHWC: the depthwise tile [tile_px][ldt] at offset 0. NCHW: the depthwise
  // tile in column blocks of NR pixels, block b holding [C][NR] (so the micro-kernel reads it as a
  // packed panel) at offset 0; one channel's row of the tile (ldt elements, with slack for whole
  // vectors) at row_offset; the plane at plane_offset.
  // NCHW double-buffers the row and the plane (channel c's buffers are written while channel
  // c-1's are read), so loads never wait on stores still in flight (store-forwarding stalls):
  // buffer i of each starts i * row_stride / plane_stride elements after its offset.
  // With statistics (stats true): per-worker double sums [CO] and sums of squares [CO] of y at
  // stats_offset, zeroed before the call and added up across workers after it.
  // With y_transposed (JointTensors::y_transposed): the work item's outputs in the computing
  // layout at out_offset, NCHW [CO][ldo], NHWC [tile_px][ldo], then transposed into y.
  int64_t ldt = 0;
  bool stats = false;
  std::size_t stats_offset = 0;
  bool y_transposed = false;
  // NHWC rows-first items (nhwc_rows_first) ask for the next row block's output lines ahead: set
  // when the call's output is too large to still be in the cores' L2 when written.
  bool prefetch_output = false;
  std::size_t out_offset = 0;
  int64_t ldo = 0;
  std::size_t row_offset = 0, plane_offset = 0;
  int64_t row_stride = 0, plane_stride = 0;
  std::size_t scratch_bytes = 0;   // per worker, total

  // Inverted residual (expand non-null): each tile's depthwise input is computed by the tile's
  // worker first (ExpandStage), into the band at expand->band_offset of its scratch.
  const ExpandStage<T>* expand = nullptr;

  int64_t x_channel(int64_t n, int64_t c) const { return (n * C + c) * x_rows * W; }
  int64_t x_image(int64_t n) const { return n * x_rows * W * C; }
};

// Per-ISA entry points.
// Pixel vectors the dense convolution computes per pass (kernel_dense_conv.h says why).
constexpr int kDenseConvVectors = 4;
// Pixels per group of the NHWC-output loop (kernel_dense_conv.h).
constexpr int kDenseNhwcPixels = 8;

// One call of the dense convolution (dense_conv.h): its geometry, tensors and the length of a
// zero-padded input row in the workers' scratch (scratch_elems per worker: the tap vectors, then
// C * KH rows).
template <typename T>
struct DensePlan {
  int64_t C = 0, H = 0, Wd = 0, CO = 0, OH = 0, OW = 0, KH = 0, KW = 0;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t taps = 0, row_len = 0, scratch_elems = 0;
  const T* x = nullptr;
  const T* w = nullptr;      // [CO][taps]
  const T* shift = nullptr;  // [CO] or null
  Activation act = Activation::kNone;
  T* y = nullptr;
  bool nhwc_out = false;  // y is NHWC (kernel_dense_conv.h), from:
  const T* w_nhwc = nullptr;      // [taps][co_pad]: w transposed, zeros past CO
  const T* shift_nhwc = nullptr;  // [co_pad]: shift (or zeros), zeros past CO
  int64_t co_pad = 0;             // dense_nhwc_channels(CO, the path's vector width)
};

// Output channels the NHWC dense convolution computes for `co` of them with `vw`-wide vectors (whole
// pairs of vectors; its transposed weights and shifts are zero-padded to this many).
inline int64_t dense_nhwc_channels(int64_t co, int64_t vw) { return (co + 2 * vw - 1) / (2 * vw) * (2 * vw); }

template <typename T>
struct IsaOps {
  Isa isa;
  int mr;  // micro-kernel rows
  int nr;  // micro-kernel columns (a multiple of the vector width)
  int vw;  // vector width (elements)
  // Runs work items [begin, end) of `plan` using `scratch` (plan.scratch_bytes, 64-byte aligned).
  // *dw_tile names the (image, tile) whose depthwise output the scratch holds (-1: none); it is
  // reused when the next item has the same tile, and updated.
  void (*run_items)(const Plan<T>& plan, int64_t begin, int64_t end, void* scratch,
                    int64_t* dw_tile);
  // Shared-depthwise mode's first phase: depthwise items [begin, end) (see Plan::shared_dw).
  void (*run_depthwise)(const Plan<T>& plan, int64_t begin, int64_t end, void* scratch);
  // Dense convolution rows [begin, end) (row = n * OH + oy) with plan.scratch_elems of scratch.
  void (*run_dense_rows)(const DensePlan<T>& plan, int64_t begin, int64_t end, T* scratch);
  // Test hooks: p[i] = activation a of p[i] for i in [0, n), as the kernels compute it (whole
  // vectors, then the rest one by one); y[i] = e^x[i] by the path's exp (exp_vec for the vector
  // paths, on every element; std::exp for the scalar one).
  void (*activate_n)(Activation a, T* p, int64_t n);
  void (*exp_n)(const T* x, T* y, int64_t n);
  // b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols (kernel_transpose.h).
  void (*transpose)(const T* a, int64_t lda, T* b, int64_t ldb, int64_t rows, int64_t cols);
};

// The entry points of `isa` for T (double: the scalar path for every isa), or null when this
// build lacks the path.
template <typename T>
const IsaOps<T>* ops_for(Isa isa);

const IsaOps<float>* scalar_ops_f32();
const IsaOps<double>* scalar_ops_f64();
#if defined(LWK_HAVE_AVX2)
const IsaOps<float>* avx2_ops_f32();
#endif
#if defined(LWK_HAVE_AVX512)
const IsaOps<float>* avx512_ops_f32();
#endif
#if defined(LWK_HAVE_NEON)
const IsaOps<float>* neon_ops_f32();
#endif

// Test/benchmark hooks: byte budget of the per-worker depthwise tile (0 = built-in default), and
// the largest NCHW plane (elements) before the direct depthwise path is used instead
// (negative = built-in default; 0 forces the direct path).
void set_tile_budget_bytes(std::size_t bytes);
std::size_t tile_budget_bytes();
void set_plane_limit_elems(int64_t elems);
int64_t plane_limit_elems();
// Shared-depthwise mode (see Plan::shared_dw): -1 = when the cost model prefers it (default),
// 0 = never, 1 = whenever more than one worker runs and the buffer fits.
void set_shared_depthwise(int mode);
int shared_depthwise();

}  // namespace detail
}  // namespace lwk
