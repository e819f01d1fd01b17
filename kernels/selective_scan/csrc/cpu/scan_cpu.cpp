// The selective scan (S6) on the CPU: the kernels of selective_scan::fwd / ::bwd for CPU tensors (ops.cpp registers
// them).
//
// Work split: one task per (batch, B/C group, block of kLanes channels of that group), run with at::parallel_for.
// A task walks the sequence in chunks of kChunk steps: it transposes the chunk's rows of u and delta into
// (step, lane) tiles, then steps through the chunk with every lane's state in a vector, so exp, softplus and the
// recurrence run kLanes channels at once. The forward pass saves the state entering each chunk (the
// `checkpoints` output); the backward pass walks the chunks from the last, recomputes a chunk's states from its
// checkpoint and runs the reverse recurrence through it. Sums over the channels of a group (dB, dC) are summed
// per task and added over tasks afterwards; per-channel sums over the batch (dA, dD, ddelta_bias) likewise.
// Compute is fp32 for float32, float16 and bfloat16 inputs (float64 runs the PyTorch implementation).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace selective_scan {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;  // steps per chunk; ops.py CPU_CHUNK must equal this

struct ScanArgs {
  int64_t batch, channels, length, d_state, groups, delta_rows;
  int64_t per_group, blocks_per_group, num_chunks;
  bool softplus;
  const void *u, *delta, *B, *C;       // input dtype
  const float *A, *D, *bias;           // D / bias may be null; bias has one entry per channel
  float* checkpoints;                  // (batch, channels, num_chunks, N): the state entering each chunk
  // forward
  void* out;                           // (batch, channels, L): fp32 or the input dtype (out_float)
  bool out_float;
  float* last_state;                   // (batch, channels, N)
  // backward
  const void* dout;                    // fp32 or the input dtype (dout_float)
  bool dout_float;
  const float* dlast_state;            // may be null
  void* du;                            // input dtype
  void* ddelta;                        // the input dtype, or fp32 per channel (ddelta_per_channel)
  bool ddelta_per_channel;
  float *dA, *dD, *dbias;              // per (batch, channel[, N]) partial sums; dD / dbias may be null
  float *dB, *dC;                      // (batch, groups, blocks_per_group, N, L) partial sums
};

// Where a task's lanes live: channel of lane 0, how many lanes are real, and the per-lane constants.
struct Block {
  int64_t b, g, blk, c0, lanes;
  VecArray A, A_log2;  // (N): A of each lane's channel for state n, and A log2(e) (decay = 2^(dt A log2(e)))
  VecF D{}, bias{};
  explicit Block(int64_t d_state) : A(d_state), A_log2(d_state) {}
  float* ckpt_row(const ScanArgs& a, int64_t lane) const {
    return a.checkpoints + (b * a.channels + c0 + lane) * a.num_chunks * a.d_state;
  }
};

Block make_block(const ScanArgs& a, int64_t task) {
  Block k(a.d_state);
  k.blk = task % a.blocks_per_group;
  k.g = (task / a.blocks_per_group) % a.groups;
  k.b = task / (a.blocks_per_group * a.groups);
  k.c0 = k.g * a.per_group + k.blk * kLanes;
  k.lanes = std::min<int64_t>(kLanes, a.per_group - k.blk * kLanes);
  for (int64_t i = 0; i < k.lanes; ++i) {
    const int64_t c = k.c0 + i;
    for (int64_t n = 0; n < a.d_state; ++n) k.A[n][i] = a.A[c * a.d_state + n];
    if (a.D) k.D[i] = a.D[c];
    if (a.bias) k.bias[i] = a.bias[c];
  }
  for (int64_t n = 0; n < a.d_state; ++n) k.A_log2[n] = k.A[n] * kLog2e;
  return k;
}

// tile[t * kLanes + i] = row_i[t0 + t] as fp32 for t < steps, where row_i is the (batch b, channel c0 + i) row of a
// (batch, rows, L) tensor whose row for channel c is c / (channels / rows); unused lanes are 0. Blocks of kLanes
// steps are transposed in registers.
template <typename T>
VEC_INLINE void load_tile(float* tile, const T* data, int64_t rows, const ScanArgs& a, const Block& k, int64_t t0,
                          int64_t steps) {
  const int64_t channels_per_row = a.channels / rows;
  const T* src[kLanes];
  for (int64_t i = 0; i < k.lanes; ++i) src[i] = data + (k.b * rows + (k.c0 + i) / channels_per_row) * a.length + t0;
  int64_t t = 0;
#if VEC_HAS_TRANSPOSE
  for (; t + kLanes <= steps; t += kLanes) {
    VecF block[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) block[i] = i < k.lanes ? load_as_float(src[i] + t) : VecF{};
    transpose(block);
    for (int64_t j = 0; j < kLanes; ++j) store(tile + (t + j) * kLanes, block[j]);
  }
#endif
  for (; t < steps; ++t) {
    for (int64_t i = 0; i < kLanes; ++i) tile[t * kLanes + i] = i < k.lanes ? static_cast<float>(src[i][t]) : 0.0f;
  }
}

// The inverse for a (batch, channels, L) output of type O.
template <typename O>
VEC_INLINE void store_tile(O* data, const float* tile, const ScanArgs& a, const Block& k, int64_t t0, int64_t steps) {
  O* dst[kLanes];
  for (int64_t i = 0; i < k.lanes; ++i) dst[i] = data + (k.b * a.channels + k.c0 + i) * a.length + t0;
  int64_t t = 0;
#if VEC_HAS_TRANSPOSE
  for (; t + kLanes <= steps; t += kLanes) {
    VecF block[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) block[j] = load(tile + (t + j) * kLanes);
    transpose(block);
    for (int64_t i = 0; i < k.lanes; ++i) store_as(dst[i] + t, block[i]);
  }
#endif
  for (; t < steps; ++t) {
    for (int64_t i = 0; i < k.lanes; ++i) dst[i][t] = static_cast<O>(tile[t * kLanes + i]);
  }
}

template <typename T>
VEC_INLINE void load_dout_tile(float* tile, const ScanArgs& a, const Block& k, int64_t t0, int64_t steps) {
  if (a.dout_float) {
    load_tile(tile, static_cast<const float*>(a.dout), a.channels, a, k, t0, steps);
  } else {
    load_tile(tile, static_cast<const T*>(a.dout), a.channels, a, k, t0, steps);
  }
}

// The time step of every lane from the pre-activation z (delta + bias), and its slope d dt / d z.
VEC_INLINE VecF time_step(const ScanArgs& a, VecF z, VecF* slope = nullptr) {
  if (a.softplus) return softplus(z, slope);
  if (slope) *slope = splat(1.0f);
  return z;
}

// The recurrences run state by state over a chunk: each state's is one dependency chain through the chunk, and
// the work of different steps (exps, products, the output sums kept in (step, lane) tiles) overlaps around it.
template <typename T>
VEC_INLINE void scan_fwd_task(const ScanArgs& a, int64_t task) {
  const Block k = make_block(a, task);
  const int64_t N = a.d_state, L = a.length;
  const T* Bg = static_cast<const T*>(a.B) + (k.b * a.groups + k.g) * N * L;
  const T* Cg = static_cast<const T*>(a.C) + (k.b * a.groups + k.g) * N * L;
  alignas(64) float dtu_tile[kChunk * kLanes], dt_tile[kChunk * kLanes], y_tile[kChunk * kLanes];
  VecArray h(N);
  for (int64_t chunk = 0; chunk < a.num_chunks; ++chunk) {
    const int64_t t0 = chunk * kChunk, steps = std::min(kChunk, L - t0);
    for (int64_t i = 0; i < k.lanes; ++i) {
      float* saved = k.ckpt_row(a, i) + chunk * N;
      for (int64_t n = 0; n < N; ++n) saved[n] = h[n][i];
    }
    load_tile(dtu_tile, static_cast<const T*>(a.u), a.channels, a, k, t0, steps);
    load_tile(dt_tile, static_cast<const T*>(a.delta), a.delta_rows, a, k, t0, steps);
    for (int64_t t = 0; t < steps; ++t) {
      const VecF u = load(dtu_tile + t * kLanes);
      const VecF dt = time_step(a, load(dt_tile + t * kLanes) + k.bias);
      store(dt_tile + t * kLanes, dt);
      store(dtu_tile + t * kLanes, dt * u);
      store(y_tile + t * kLanes, k.D * u);
    }
    for (int64_t n = 0; n < N; ++n) {
      const VecF A = k.A_log2[n];
      const T* Bn = Bg + n * L + t0;
      const T* Cn = Cg + n * L + t0;
      VecF hn = h[n];
      for (int64_t t = 0; t < steps; ++t) {
        hn = vexp2(load(dt_tile + t * kLanes) * A) * hn + load(dtu_tile + t * kLanes) * static_cast<float>(Bn[t]);
        store(y_tile + t * kLanes, load(y_tile + t * kLanes) + hn * static_cast<float>(Cn[t]));
      }
      h[n] = hn;
    }
    if (a.out_float) {
      store_tile(static_cast<float*>(a.out), y_tile, a, k, t0, steps);
    } else {
      store_tile(static_cast<T*>(a.out), y_tile, a, k, t0, steps);
    }
  }
  for (int64_t i = 0; i < k.lanes; ++i)
    for (int64_t n = 0; n < N; ++n) a.last_state[((k.b * a.channels) + k.c0 + i) * N + n] = h[n][i];
}

template <typename T>
VEC_INLINE void scan_bwd_task(const ScanArgs& a, int64_t task) {
  const Block k = make_block(a, task);
  const int64_t N = a.d_state, L = a.length;
  const T* Bg = static_cast<const T*>(a.B) + (k.b * a.groups + k.g) * N * L;
  const T* Cg = static_cast<const T*>(a.C) + (k.b * a.groups + k.g) * N * L;
  float* dB = a.dB + ((k.b * a.groups + k.g) * a.blocks_per_group + k.blk) * N * L;
  float* dC = a.dC + ((k.b * a.groups + k.g) * a.blocks_per_group + k.blk) * N * L;
  constexpr int64_t kTile = kChunk * kLanes;
  alignas(64) float u_tile[kTile], dt_tile[kTile], slope_tile[kTile], dtu_tile[kTile], dy_tile[kTile];
  alignas(64) float g_b_tile[kTile], ddt_tile[kTile];  // dL/d(dt u) and dL/d dt, summed over the states
  VecArray decay(N * kChunk), h_before(N * kChunk);      // a_t and h_{t-1} per (state, step)
  VecArray g(N), dA(N);  // g[n] holds a_{t+1} g_{t+1} on entry to step t (g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1})
  VecF dD{}, dbias{};
  if (a.dlast_state) {
    for (int64_t i = 0; i < k.lanes; ++i)
      for (int64_t n = 0; n < N; ++n) g[n][i] = a.dlast_state[(k.b * a.channels + k.c0 + i) * N + n];
  }
  for (int64_t chunk = a.num_chunks - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * kChunk, steps = std::min(kChunk, L - t0);
    load_tile(u_tile, static_cast<const T*>(a.u), a.channels, a, k, t0, steps);
    load_tile(dt_tile, static_cast<const T*>(a.delta), a.delta_rows, a, k, t0, steps);
    load_dout_tile<T>(dy_tile, a, k, t0, steps);
    for (int64_t t = 0; t < steps; ++t) {
      VecF slope;
      const VecF dt = time_step(a, load(dt_tile + t * kLanes) + k.bias, &slope);
      store(dt_tile + t * kLanes, dt);
      store(slope_tile + t * kLanes, slope);
      store(dtu_tile + t * kLanes, dt * load(u_tile + t * kLanes));
      store(g_b_tile + t * kLanes, VecF{});
      store(ddt_tile + t * kLanes, VecF{});
    }
    for (int64_t n = 0; n < N; ++n) {
      const T* Bn = Bg + n * L + t0;
      const T* Cn = Cg + n * L + t0;
      VecF h{};
      for (int64_t i = 0; i < k.lanes; ++i) h[i] = k.ckpt_row(a, i)[chunk * N + n];
      for (int64_t t = 0; t < steps; ++t) {  // the chunk's forward pass again
        const VecF decay_t = vexp2(load(dt_tile + t * kLanes) * k.A_log2[n]);
        decay[n * kChunk + t] = decay_t;
        h_before[n * kChunk + t] = h;
        h = decay_t * h + load(dtu_tile + t * kLanes) * static_cast<float>(Bn[t]);
      }
      VecF gn = g[n], dAn = dA[n];
      for (int64_t t = steps - 1; t >= 0; --t) {
        const float B = static_cast<float>(Bn[t]), C = static_cast<float>(Cn[t]);
        const VecF dy = load(dy_tile + t * kLanes), dt = load(dt_tile + t * kLanes), dtu = load(dtu_tile + t * kLanes);
        const VecF decay_t = decay[n * kChunk + t], before = h_before[n * kChunk + t];
        gn += dy * C;
        dC[n * L + t0 + t] = hsum((decay_t * before + dtu * B) * dy);
        dB[n * L + t0 + t] = hsum(gn * dtu);
        store(g_b_tile + t * kLanes, load(g_b_tile + t * kLanes) + gn * B);
        const VecF through_decay = gn * decay_t * before;  // dL/d(dt A)
        store(ddt_tile + t * kLanes, load(ddt_tile + t * kLanes) + through_decay * k.A[n]);
        dAn += through_decay * dt;
        gn *= decay_t;
      }
      g[n] = gn;
      dA[n] = dAn;
    }
    for (int64_t t = 0; t < steps; ++t) {
      const VecF u = load(u_tile + t * kLanes), dy = load(dy_tile + t * kLanes), g_b = load(g_b_tile + t * kLanes);
      const VecF dz = (load(ddt_tile + t * kLanes) + g_b * u) * load(slope_tile + t * kLanes);
      dD += dy * u;
      dbias += dz;
      store(u_tile + t * kLanes, g_b * load(dt_tile + t * kLanes) + k.D * dy);  // du
      store(dt_tile + t * kLanes, dz);                                       // d delta (per channel)
    }
    store_tile(static_cast<T*>(a.du), u_tile, a, k, t0, steps);
    if (a.ddelta_per_channel) {
      store_tile(static_cast<float*>(a.ddelta), dt_tile, a, k, t0, steps);
    } else {
      store_tile(static_cast<T*>(a.ddelta), dt_tile, a, k, t0, steps);
    }
  }
  for (int64_t i = 0; i < k.lanes; ++i) {
    const int64_t row = k.b * a.channels + k.c0 + i;
    for (int64_t n = 0; n < N; ++n) a.dA[row * N + n] = dA[n][i];
    if (a.dD) a.dD[row] = dD[i];
    if (a.dbias) a.dbias[row] = dbias[i];
  }
}

// One compiled clone set per input dtype (target_clones applies to plain functions, not templates).
CPU_KERNEL void scan_fwd_f32(const ScanArgs& a, int64_t task) { scan_fwd_task<float>(a, task); }
CPU_KERNEL void scan_fwd_f16(const ScanArgs& a, int64_t task) { scan_fwd_task<c10::Half>(a, task); }
CPU_KERNEL void scan_fwd_bf16(const ScanArgs& a, int64_t task) { scan_fwd_task<c10::BFloat16>(a, task); }
CPU_KERNEL void scan_bwd_f32(const ScanArgs& a, int64_t task) { scan_bwd_task<float>(a, task); }
CPU_KERNEL void scan_bwd_f16(const ScanArgs& a, int64_t task) { scan_bwd_task<c10::Half>(a, task); }
CPU_KERNEL void scan_bwd_bf16(const ScanArgs& a, int64_t task) { scan_bwd_task<c10::BFloat16>(a, task); }

using TaskFn = void (*)(const ScanArgs&, int64_t);

TaskFn pick(at::ScalarType dtype, TaskFn f32, TaskFn f16, TaskFn bf16) {
  switch (dtype) {
    case at::kFloat: return f32;
    case at::kHalf: return f16;
    case at::kBFloat16: return bf16;
    default:
      TORCH_CHECK(false, "selective_scan: the CPU kernel takes float32, float16 or bfloat16 `u`, got ", dtype,
                  " (float64 runs the PyTorch implementation: backend='torch')");
  }
  return nullptr;
}

void run_tasks(TaskFn fn, const ScanArgs& a) {
  const int64_t tasks = a.batch * a.groups * a.blocks_per_group;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) fn(a, task);
  });
}

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), "selective_scan: `", name, "` must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "selective_scan: `", name, "` must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "selective_scan: `", name, "` must have ", dims, " dimensions");
}

// Checks the shapes (the Python layer has named the problem already) and fills the shared fields.
ScanArgs make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& delta_bias, bool softplus, at::Tensor& bias_per_channel) {
  check_input(u, "u", u.scalar_type(), 3);
  check_input(delta, "delta", u.scalar_type(), 3);
  check_input(A, "A", at::kFloat, 2);
  check_input(B, "B", u.scalar_type(), 4);
  check_input(C, "C", u.scalar_type(), 4);
  ScanArgs a{};
  a.batch = u.size(0);
  a.channels = u.size(1);
  a.length = u.size(2);
  a.d_state = A.size(1);
  a.delta_rows = delta.size(1);
  a.groups = B.size(1);
  TORCH_CHECK(a.d_state >= 1 && A.size(0) == a.channels, "selective_scan: `A` must be (K*D, N >= 1)");
  TORCH_CHECK(delta.size(0) == a.batch && delta.size(2) == a.length && a.delta_rows > 0 &&
                  a.channels % a.delta_rows == 0, "selective_scan: bad `delta` shape");
  TORCH_CHECK(B.sizes() == C.sizes() && B.size(0) == a.batch && B.size(2) == a.d_state && B.size(3) == a.length &&
                  a.groups > 0 && a.channels % a.groups == 0, "selective_scan: bad `B`/`C` shape");
  a.per_group = a.channels / a.groups;
  a.blocks_per_group = (a.per_group + kLanes - 1) / kLanes;
  a.num_chunks = (a.length + kChunk - 1) / kChunk;
  a.softplus = softplus;
  a.A = A.data_ptr<float>();
  if (D) {
    check_input(*D, "D", at::kFloat, 1);
    TORCH_CHECK(D->size(0) == a.channels, "selective_scan: `D` must have K*D entries");
    a.D = D->data_ptr<float>();
  }
  if (delta_bias) {
    check_input(*delta_bias, "delta_bias", at::kFloat, 1);
    const int64_t len = delta_bias->size(0);
    TORCH_CHECK(len == a.channels || len == a.delta_rows, "selective_scan: bad `delta_bias` length");
    bias_per_channel = len == a.channels ? *delta_bias : delta_bias->repeat_interleave(a.channels / len);
    a.bias = bias_per_channel.data_ptr<float>();
  }
  a.u = u.data_ptr();
  a.delta = delta.data_ptr();
  a.B = B.data_ptr();
  a.C = C.data_ptr();
  return a;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u_in, const at::Tensor& delta_in,
                                                        const at::Tensor& A_in, const at::Tensor& B_in,
                                                        const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
                                                        const std::optional<at::Tensor>& bias_in, bool softplus,
                                                        bool out_float) {
  const TaskFn fn = pick(u_in.scalar_type(), scan_fwd_f32, scan_fwd_f16, scan_fwd_bf16);
  const auto u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(),
             C = C_in.contiguous();
  const auto D = contiguous(D_in), delta_bias = contiguous(bias_in);
  at::Tensor bias_per_channel;
  ScanArgs a = make_args(u, delta, A, B, C, D, delta_bias, softplus, bias_per_channel);
  const auto f32 = u.options().dtype(at::kFloat);
  auto out = at::empty(u.sizes(), out_float ? f32 : u.options());
  auto last_state = at::zeros({a.batch, a.channels, a.d_state}, f32);
  auto checkpoints = at::empty({a.batch, a.channels, a.num_chunks, a.d_state}, f32);
  if (u.numel() == 0) return {out, last_state, checkpoints};
  a.out = out.data_ptr();
  a.out_float = out_float;
  a.last_state = last_state.data_ptr<float>();
  a.checkpoints = checkpoints.data_ptr<float>();
  run_tasks(fn, a);
  return {out, last_state, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dlast_in, const at::Tensor& u_in,
    const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
    const std::optional<at::Tensor>& D_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& checkpoints,
    bool softplus) {
  const TaskFn fn = pick(u_in.scalar_type(), scan_bwd_f32, scan_bwd_f16, scan_bwd_bf16);
  const auto u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(),
             C = C_in.contiguous(), dout = dout_in.contiguous();
  const auto D = contiguous(D_in), delta_bias = contiguous(bias_in), dlast_state = contiguous(dlast_in);
  at::Tensor bias_per_channel;
  ScanArgs a = make_args(u, delta, A, B, C, D, delta_bias, softplus, bias_per_channel);
  TORCH_CHECK(dout.sizes() == u.sizes() && (dout.scalar_type() == at::kFloat || dout.scalar_type() == u.scalar_type()),
              "selective_scan: the output gradient must be shaped like `u`, float32 or u's dtype");
  TORCH_CHECK(checkpoints.scalar_type() == at::kFloat && checkpoints.is_contiguous() &&
                  checkpoints.numel() == a.batch * a.channels * a.num_chunks * a.d_state,
              "selective_scan: `checkpoints` do not come from the CPU forward of these inputs");
  if (dlast_state) {
    TORCH_CHECK(dlast_state->scalar_type() == at::kFloat && dlast_state->numel() == a.batch * a.channels * a.d_state,
                "selective_scan: the last-state gradient must be float32 (batch, K*D, N)");
  }
  const auto f32 = u.options().dtype(at::kFloat);
  const bool delta_groups = a.delta_rows != a.channels;
  auto du = at::empty_like(u);
  auto ddelta = delta_groups ? at::empty({a.batch, a.channels, a.length}, f32) : at::empty_like(delta);
  auto dA = at::zeros({a.batch, a.channels, a.d_state}, f32);
  auto dD = at::zeros({a.batch, a.channels}, f32);
  auto dbias = at::zeros({a.batch, a.channels}, f32);
  auto dB = at::zeros({a.batch, a.groups, a.blocks_per_group, a.d_state, a.length}, f32);
  auto dC = at::zeros_like(dB);
  if (u.numel() > 0) {
    a.checkpoints = checkpoints.data_ptr<float>();
    a.dout = dout.data_ptr();
    a.dout_float = dout.scalar_type() == at::kFloat;
    a.dlast_state = dlast_state ? dlast_state->data_ptr<float>() : nullptr;
    a.du = du.data_ptr();
    a.ddelta = ddelta.data_ptr();
    a.ddelta_per_channel = delta_groups;
    a.dA = dA.data_ptr<float>();
    a.dD = D ? dD.data_ptr<float>() : nullptr;
    a.dbias = delta_bias ? dbias.data_ptr<float>() : nullptr;
    a.dB = dB.data_ptr<float>();
    a.dC = dC.data_ptr<float>();
    run_tasks(fn, a);
  }
  if (delta_groups) {
    ddelta = ddelta.view({a.batch, a.delta_rows, a.channels / a.delta_rows, a.length}).sum(2).to(delta.scalar_type());
  }
  at::Tensor ddelta_bias = at::empty({0}, u.options());  // empty when absent, as the PyTorch implementation's
  if (delta_bias) {
    ddelta_bias = dbias.sum(0);
    if (delta_bias->size(0) != a.channels) ddelta_bias = ddelta_bias.view({a.delta_rows, -1}).sum(1);
  }
  return {du, ddelta, dA.sum(0), dB.sum(2).to(B.scalar_type()), dC.sum(2).to(C.scalar_type()),
          D ? dD.sum(0) : at::empty({0}, u.options()), ddelta_bias};
}

}  // namespace cpu
}  // namespace selective_scan
