// The fused SS2D core on the CPU: the kernels of selective_scan_ss2d::fwd / ::bwd for CPU tensors, which ops.cpp
// registers (the contract of selective_scan/ss2d.py: the four cross2d routes, dt = softplus(W_dt x_dbl + bias) per
// step, the routes' outputs added into one fp32 map), for any d_state N and dt rank R.
//
// Work split: one task per (batch, block of kLanes channels), run with at::parallel_for. A task walks the four
// routes one after another through their index maps over the channels-last map, so a step reads kLanes
// contiguous channels of x and one x_dbl row, and the task alone writes its channels of y (or dx): no atomics,
// no flipped or transposed copies. A route is walked in chunks of kChunk steps, each in three passes: the
// per-step work (the dt projection, four steps at a time; softplus; u), the recurrences state by state (one
// dependency chain per state, the exps off it), and the output. The forward pass saves the states entering each
// chunk (`ckpt`); the backward pass recomputes a chunk from them, then runs the reverse recurrence through it.
// Its sums over channels (the gradient of x_dbl's B and C columns) are summed per task and added over tasks
// afterwards; the gradients of the dt projection (x_dbl's dt-rank columns, W_dt, the bias) are GEMMs and sums
// over d(dt pre-activation), which the kernel writes out.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace selective_scan {
namespace cpu {
namespace {

constexpr int64_t kRoutes = 4;
constexpr int64_t kChunk = 64;  // steps per checkpoint; ss2d.py CPU_CHUNK must equal this
constexpr int64_t kTile = kChunk * kLanes;

struct Ss2dArgs {
  int64_t batch, length, dim, rank, d_state, blocks, num_chunks;
  int64_t row_width;         // R + 2N: an x_dbl row of one route is [dt-rank values, B (N), C (N)]
  const int32_t* positions;  // (4, L): raster position of route k's step t
  const void *x, *xdbl;      // x's dtype: (B, L, D), (B, L, 4, R + 2N)
  const float *dt_weight, *dt_bias, *A_log, *Ds;
  float* ckpt;  // (B, 4, num_chunks, N, D): the states entering each chunk of each route
  // forward
  float* y;  // (B, L, D)
  // backward
  const float* dy;  // (B, L, D)
  float* dx;        // (B, L, D), fp32
  float* dz;        // (4, B, L, D): d loss / d(dt pre-activation)
  float* dbc;       // (blocks, B, L, 4, 2N): per-task sums over channels of d B, d C
  float *dA, *dD;   // (B, 4D, N), (B, 4D): per-batch sums of d A and d Ds
};

// A task's lanes and the per-lane parameters of one route.
struct RouteBlock {
  int64_t b, blk, c0, lanes, k;
  VecArray weight;     // (R): W_dt[k, c0 + lane, r]
  VecArray A, A_log2;  // (N): A = -exp(A_log), and A log2(e) (the decay is 2^(dt A log2(e)))
  VecF bias{}, D{};

  RouteBlock(const Ss2dArgs& a, int64_t task, int64_t route)
      : k(route), weight(a.rank), A(a.d_state), A_log2(a.d_state) {
    b = task / a.blocks;
    blk = task % a.blocks;
    c0 = blk * kLanes;
    lanes = std::min<int64_t>(kLanes, a.dim - c0);
    for (int64_t i = 0; i < lanes; ++i) {
      const int64_t c = c0 + i;
      for (int64_t r = 0; r < a.rank; ++r) weight[r][i] = a.dt_weight[(k * a.dim + c) * a.rank + r];
      for (int64_t n = 0; n < a.d_state; ++n) A[n][i] = -std::exp(a.A_log[(k * a.dim + c) * a.d_state + n]);
      bias[i] = a.dt_bias[k * a.dim + c];
      D[i] = a.Ds[k * a.dim + c];
    }
    for (int64_t n = 0; n < a.d_state; ++n) A_log2[n] = A[n] * kLog2e;
  }
  float* ckpt(const Ss2dArgs& a, int64_t chunk, int64_t n) const {
    return a.ckpt + (((b * kRoutes + k) * a.num_chunks + chunk) * a.d_state + n) * a.dim + c0;
  }
};

// The steps of one chunk of a route: each step's (batch, position) index, the offset of its lane 0 in a (B, L, D)
// map and its x_dbl row.
template <typename T>
struct ChunkSteps {
  int64_t steps;
  int64_t position[kChunk], element[kChunk];
  const T* row[kChunk];

  ChunkSteps(const Ss2dArgs& a, const RouteBlock& rb, int64_t chunk) {
    const int64_t t0 = chunk * kChunk;
    steps = std::min(kChunk, a.length - t0);
    const int32_t* route = a.positions + rb.k * a.length + t0;
    for (int64_t t = 0; t < steps; ++t) {
      position[t] = rb.b * a.length + route[t];
      element[t] = position[t] * a.dim + rb.c0;
      row[t] = static_cast<const T*>(a.xdbl) + (position[t] * kRoutes + rb.k) * a.row_width;
    }
  }
};

// z[t] = bias + W_dt x_dbl_t[:R] for the chunk's steps, four steps at a time (four independent sums).
template <typename T>
VEC_INLINE void project(float* z, const ChunkSteps<T>& cs, const RouteBlock& rb, int64_t rank) {
  int64_t t = 0;
  for (; t + 4 <= cs.steps; t += 4) {
    VecF z0 = rb.bias, z1 = rb.bias, z2 = rb.bias, z3 = rb.bias;
    const T *r0 = cs.row[t], *r1 = cs.row[t + 1], *r2 = cs.row[t + 2], *r3 = cs.row[t + 3];
    for (int64_t r = 0; r < rank; ++r) {
      const VecF w = rb.weight[r];
      z0 += w * static_cast<float>(r0[r]);
      z1 += w * static_cast<float>(r1[r]);
      z2 += w * static_cast<float>(r2[r]);
      z3 += w * static_cast<float>(r3[r]);
    }
    store(z + t * kLanes, z0);
    store(z + (t + 1) * kLanes, z1);
    store(z + (t + 2) * kLanes, z2);
    store(z + (t + 3) * kLanes, z3);
  }
  for (; t < cs.steps; ++t) {
    VecF zt = rb.bias;
    for (int64_t r = 0; r < rank; ++r) zt += rb.weight[r] * static_cast<float>(cs.row[t][r]);
    store(z + t * kLanes, zt);
  }
}

template <typename T>
VEC_INLINE void ss2d_fwd_task(const Ss2dArgs& a, int64_t task) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t N = a.d_state, R = a.rank;
  alignas(64) float dt_tile[kTile], dtu_tile[kTile], y_tile[kTile];
  VecArray h(N);
  for (int64_t k = 0; k < kRoutes; ++k) {
    const RouteBlock rb(a, task, k);
    for (int64_t n = 0; n < N; ++n) h[n] = VecF{};
    for (int64_t chunk = 0; chunk < a.num_chunks; ++chunk) {
      for (int64_t n = 0; n < N; ++n) store_as(rb.ckpt(a, chunk, n), h[n], rb.lanes);
      const ChunkSteps<T> cs(a, rb, chunk);
      project(dt_tile, cs, rb, R);
      for (int64_t t = 0; t < cs.steps; ++t) {
        const VecF dt = softplus(load(dt_tile + t * kLanes));
        const VecF u = load_as_float(x + cs.element[t], rb.lanes);
        store(dt_tile + t * kLanes, dt);
        store(dtu_tile + t * kLanes, dt * u);
        store(y_tile + t * kLanes, rb.D * u);
      }
      for (int64_t n = 0; n < N; ++n) {
        const VecF A = rb.A_log2[n];
        VecF hn = h[n];
        for (int64_t t = 0; t < cs.steps; ++t) {
          const float B = static_cast<float>(cs.row[t][R + n]), C = static_cast<float>(cs.row[t][R + N + n]);
          hn = vexp2(load(dt_tile + t * kLanes) * A) * hn + load(dtu_tile + t * kLanes) * B;
          store(y_tile + t * kLanes, load(y_tile + t * kLanes) + hn * C);
        }
        h[n] = hn;
      }
      for (int64_t t = 0; t < cs.steps; ++t) {
        float* out = a.y + cs.element[t];
        VecF y = load(y_tile + t * kLanes);
        if (k > 0) y += load_as_float(out, rb.lanes);  // route 0 visits every position first
        store_as(out, y, rb.lanes);
      }
    }
  }
}

template <typename T>
VEC_INLINE void ss2d_bwd_task(const Ss2dArgs& a, int64_t task) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t N = a.d_state, R = a.rank;
  alignas(64) float dt_tile[kTile], slope_tile[kTile], u_tile[kTile], dtu_tile[kTile], dy_tile[kTile];
  alignas(64) float g_b_tile[kTile], ddt_tile[kTile];  // dL/d(dt u) and dL/d dt, summed over the states
  VecArray decay(N * kChunk), h_before(N * kChunk);     // a_t and h_{t-1} per (state, step)
  VecArray g(N), dA(N);  // g[n] holds a_{t+1} g_{t+1} on entry to step t (g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1})
  for (int64_t k = 0; k < kRoutes; ++k) {
    const RouteBlock rb(a, task, k);
    float* dbc = a.dbc + rb.blk * a.batch * a.length * kRoutes * 2 * N;  // this task's (B, L, 4, 2N) slice
    for (int64_t n = 0; n < N; ++n) g[n] = dA[n] = VecF{};
    VecF dD{};
    for (int64_t chunk = a.num_chunks - 1; chunk >= 0; --chunk) {
      const ChunkSteps<T> cs(a, rb, chunk);
      project(dt_tile, cs, rb, R);
      for (int64_t t = 0; t < cs.steps; ++t) {
        VecF slope;
        const VecF dt = softplus(load(dt_tile + t * kLanes), &slope);
        const VecF u = load_as_float(x + cs.element[t], rb.lanes);
        store(dt_tile + t * kLanes, dt);
        store(slope_tile + t * kLanes, slope);
        store(u_tile + t * kLanes, u);
        store(dtu_tile + t * kLanes, dt * u);
        store(dy_tile + t * kLanes, load_as_float(a.dy + cs.element[t], rb.lanes));
        store(g_b_tile + t * kLanes, VecF{});
        store(ddt_tile + t * kLanes, VecF{});
      }
      for (int64_t n = 0; n < N; ++n) {
        VecF h = load_as_float(rb.ckpt(a, chunk, n), rb.lanes);
        for (int64_t t = 0; t < cs.steps; ++t) {  // the chunk's forward pass again
          const VecF decay_t = vexp2(load(dt_tile + t * kLanes) * rb.A_log2[n]);
          decay[n * kChunk + t] = decay_t;
          h_before[n * kChunk + t] = h;
          h = decay_t * h + load(dtu_tile + t * kLanes) * static_cast<float>(cs.row[t][R + n]);
        }
        VecF gn = g[n], dAn = dA[n];
        for (int64_t t = cs.steps - 1; t >= 0; --t) {
          const float B = static_cast<float>(cs.row[t][R + n]), C = static_cast<float>(cs.row[t][R + N + n]);
          const VecF dy = load(dy_tile + t * kLanes), dtu = load(dtu_tile + t * kLanes);
          const VecF decay_t = decay[n * kChunk + t], before = h_before[n * kChunk + t];
          gn += dy * C;
          float* dbc_t = dbc + (cs.position[t] * kRoutes + k) * 2 * N;  // [dB (N), dC (N)]
          dbc_t[n] = hsum(gn * dtu);
          dbc_t[N + n] = hsum((decay_t * before + dtu * B) * dy);
          store(g_b_tile + t * kLanes, load(g_b_tile + t * kLanes) + gn * B);
          const VecF through_decay = gn * decay_t * before;  // dL/d(dt A)
          store(ddt_tile + t * kLanes, load(ddt_tile + t * kLanes) + through_decay * rb.A[n]);
          dAn += through_decay * load(dt_tile + t * kLanes);
          gn *= decay_t;
        }
        g[n] = gn;
        dA[n] = dAn;
      }
      for (int64_t t = 0; t < cs.steps; ++t) {
        const VecF u = load(u_tile + t * kLanes), dy = load(dy_tile + t * kLanes), g_b = load(g_b_tile + t * kLanes);
        dD += dy * u;
        const VecF dz = (load(ddt_tile + t * kLanes) + g_b * u) * load(slope_tile + t * kLanes);
        store_as(a.dz + k * a.batch * a.length * a.dim + cs.element[t], dz, rb.lanes);
        VecF du = g_b * load(dt_tile + t * kLanes) + rb.D * dy;
        if (k > 0) du += load_as_float(a.dx + cs.element[t], rb.lanes);  // route 0 visits every position first
        store_as(a.dx + cs.element[t], du, rb.lanes);
      }
    }
    const int64_t channel = k * a.dim + rb.c0;
    for (int64_t i = 0; i < rb.lanes; ++i) {
      for (int64_t n = 0; n < N; ++n) a.dA[((rb.b * kRoutes * a.dim) + channel + i) * N + n] = dA[n][i];
      a.dD[rb.b * kRoutes * a.dim + channel + i] = dD[i];
    }
  }
}

CPU_KERNEL void ss2d_fwd_f32(const Ss2dArgs& a, int64_t task) { ss2d_fwd_task<float>(a, task); }
CPU_KERNEL void ss2d_fwd_f16(const Ss2dArgs& a, int64_t task) { ss2d_fwd_task<c10::Half>(a, task); }
CPU_KERNEL void ss2d_fwd_bf16(const Ss2dArgs& a, int64_t task) { ss2d_fwd_task<c10::BFloat16>(a, task); }
CPU_KERNEL void ss2d_bwd_f32(const Ss2dArgs& a, int64_t task) { ss2d_bwd_task<float>(a, task); }
CPU_KERNEL void ss2d_bwd_f16(const Ss2dArgs& a, int64_t task) { ss2d_bwd_task<c10::Half>(a, task); }
CPU_KERNEL void ss2d_bwd_bf16(const Ss2dArgs& a, int64_t task) { ss2d_bwd_task<c10::BFloat16>(a, task); }

using TaskFn = void (*)(const Ss2dArgs&, int64_t);

TaskFn pick(at::ScalarType dtype, TaskFn f32, TaskFn f16, TaskFn bf16) {
  switch (dtype) {
    case at::kFloat: return f32;
    case at::kHalf: return f16;
    case at::kBFloat16: return bf16;
    default: TORCH_CHECK(false, "ss2d: `x` must be float32, float16 or bfloat16, got ", dtype);
  }
  return nullptr;
}

void run_tasks(TaskFn fn, const Ss2dArgs& a) {
  at::parallel_for(0, a.batch * a.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(a, task);
  });
}

std::string shape_string(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const std::vector<int64_t>& sizes) {
  TORCH_CHECK(t.device().is_cpu(), "ss2d: `", name, "` must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "ss2d: `", name, "` must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == sizes, "ss2d: `", name, "` must have shape ", shape_string(sizes), ", got ",
              shape_string(t.sizes()));
}

// (4, L) raster positions of the cross2d routes: row-major, column-major, and both reversed.
std::vector<int32_t> route_positions(int64_t height, int64_t width) {
  const int64_t L = height * width;
  std::vector<int32_t> positions(kRoutes * L);
  for (int64_t t = 0; t < L; ++t) {
    positions[t] = static_cast<int32_t>(t);
    positions[L + t] = static_cast<int32_t>((t % height) * width + t / height);
  }
  for (int64_t t = 0; t < L; ++t) {
    positions[2 * L + t] = positions[L - 1 - t];
    positions[3 * L + t] = positions[2 * L - 1 - t];
  }
  return positions;
}

// Checks the arguments (ss2d.py has validated them with user-facing messages) and fills the shared fields.
Ss2dArgs make_args(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                   const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds,
                   const std::vector<int32_t>& positions) {
  TORCH_CHECK(x.dim() == 4 && dt_weight.dim() == 3 && A_log.dim() == 2,
              "ss2d: `x` must be (B, H, W, D), `dt_weight` (4, D, R) and `A_log` (4 * D, N)");
  const int64_t dim = x.size(3), rank = dt_weight.size(2), d_state = A_log.size(1);
  check(x, "x", x.scalar_type(), x.sizes().vec());
  check(x_dbl, "x_dbl", x.scalar_type(), {x.size(0), x.size(1), x.size(2), kRoutes * (rank + 2 * d_state)});
  check(dt_weight, "dt_weight", at::kFloat, {kRoutes, dim, rank});
  check(dt_bias, "dt_bias", at::kFloat, {kRoutes, dim});
  check(A_log, "A_log", at::kFloat, {kRoutes * dim, d_state});
  check(Ds, "Ds", at::kFloat, {kRoutes * dim});
  TORCH_CHECK(d_state >= 1, "ss2d: `A_log` must have at least one state");
  TORCH_CHECK(x.size(1) * x.size(2) < (int64_t(1) << 31), "ss2d: the map is too large for the kernel");
  Ss2dArgs a{};
  a.batch = x.size(0);
  a.length = x.size(1) * x.size(2);
  a.dim = dim;
  a.rank = rank;
  a.d_state = d_state;
  a.row_width = rank + 2 * d_state;
  a.blocks = (dim + kLanes - 1) / kLanes;
  a.num_chunks = (a.length + kChunk - 1) / kChunk;
  a.positions = positions.data();
  a.x = x.data_ptr();
  a.xdbl = x_dbl.data_ptr();
  a.dt_weight = dt_weight.data_ptr<float>();
  a.dt_bias = dt_bias.data_ptr<float>();
  a.A_log = A_log.data_ptr<float>();
  a.Ds = Ds.data_ptr<float>();
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ss2d_fwd(const at::Tensor& x_in, const at::Tensor& x_dbl_in,
                                            const at::Tensor& dt_weight_in, const at::Tensor& dt_bias_in,
                                            const at::Tensor& A_log_in, const at::Tensor& Ds_in) {
  const TaskFn fn = pick(x_in.scalar_type(), ss2d_fwd_f32, ss2d_fwd_f16, ss2d_fwd_bf16);
  const auto x = x_in.contiguous(), x_dbl = x_dbl_in.contiguous(), dt_weight = dt_weight_in.contiguous(),
             dt_bias = dt_bias_in.contiguous(), A_log = A_log_in.contiguous(), Ds = Ds_in.contiguous();
  const auto positions = route_positions(x.size(1), x.size(2));
  Ss2dArgs a = make_args(x, x_dbl, dt_weight, dt_bias, A_log, Ds, positions);
  const auto f32 = x.options().dtype(at::kFloat);
  auto y = at::empty(x.sizes(), f32);  // route 0 writes every element
  auto ckpt = at::empty({a.batch, kRoutes, a.num_chunks, a.d_state, a.dim}, f32);
  if (x.numel() == 0) return {y, ckpt};
  a.y = y.data_ptr<float>();
  a.ckpt = ckpt.data_ptr<float>();
  run_tasks(fn, a);
  return {y, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ss2d_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& x_dbl_in, const at::Tensor& dt_weight_in,
    const at::Tensor& dt_bias_in, const at::Tensor& A_log_in, const at::Tensor& Ds_in, const at::Tensor& ckpt) {
  const TaskFn fn = pick(x_in.scalar_type(), ss2d_bwd_f32, ss2d_bwd_f16, ss2d_bwd_bf16);
  const auto x = x_in.contiguous(), x_dbl = x_dbl_in.contiguous(), dt_weight = dt_weight_in.contiguous(),
             dt_bias = dt_bias_in.contiguous(), A_log = A_log_in.contiguous(), Ds = Ds_in.contiguous(),
             dy = dy_in.contiguous();
  const auto positions = route_positions(x.size(1), x.size(2));
  Ss2dArgs a = make_args(x, x_dbl, dt_weight, dt_bias, A_log, Ds, positions);
  check(dy, "dy", at::kFloat, x.sizes().vec());
  check(ckpt, "ckpt", at::kFloat, {a.batch, kRoutes, a.num_chunks, a.d_state, a.dim});
  TORCH_CHECK(ckpt.is_contiguous(), "ss2d: `ckpt` must be contiguous");
  const int64_t rows = a.batch * a.length;
  const auto f32 = x.options().dtype(at::kFloat);
  // every element of these is written by the tasks (dx by route 0 first)
  auto dx = at::empty(x.sizes(), f32);
  auto dz = at::empty({kRoutes, rows, a.dim}, f32);
  auto dbc = at::empty({a.blocks, rows, kRoutes, 2 * a.d_state}, f32);
  auto dA = at::zeros({a.batch, kRoutes * a.dim, a.d_state}, f32);
  auto dD = at::zeros({a.batch, kRoutes * a.dim}, f32);
  if (x.numel() > 0) {
    a.ckpt = ckpt.data_ptr<float>();
    a.dy = dy.data_ptr<float>();
    a.dx = dx.data_ptr<float>();
    a.dz = dz.data_ptr<float>();
    a.dbc = dbc.data_ptr<float>();
    a.dA = dA.data_ptr<float>();
    a.dD = dD.data_ptr<float>();
    run_tasks(fn, a);
  }
  // the dt projection z = W_dt x_dbl[:R] + bias, per route: d x_dbl[:R] = dz W_dt, d W_dt = dz^T x_dbl[:R]
  const auto rank_rows = x_dbl.view({rows, kRoutes, a.row_width}).narrow(2, 0, a.rank).to(at::kFloat).transpose(0, 1);
  const auto drank = at::bmm(dz, dt_weight).transpose(0, 1);                      // (rows, 4, R)
  const auto ddt_weight = at::bmm(dz.transpose(1, 2), rank_rows);                  // (4, D, R)
  const auto dx_dbl = at::cat({drank, dbc.sum(0)}, 2).view(x_dbl.sizes()).to(x_dbl.scalar_type());
  const auto dA_log = dA.sum(0).mul(A_log.exp().neg());  // dA/dA_log = A = -exp(A_log)
  return {dx.to(x.scalar_type()), dx_dbl, ddt_weight, dz.sum(1), dA_log, dD.sum(0)};
}

}  // namespace cpu
}  // namespace selective_scan
