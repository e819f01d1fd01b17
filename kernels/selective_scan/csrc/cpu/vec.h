// Vector arithmetic of the CPU kernels: a block of kLanes fp32 values (GCC/Clang vector extensions, lowered to
// whatever the target has: one AVX-512 register, two AVX2 ones, four SSE or NEON ones), with exp, softplus and
// sigmoid written as branch-free polynomials, and loads/stores that convert float16/bfloat16 to and from fp32.
//
// The kernels' hot functions are compiled once per x86-64 feature level (CPU_KERNEL, GCC 12 or newer) and the
// best one the machine supports is picked when the extension loads; elsewhere they are compiled for the
// baseline target.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CPU_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CPU_KERNEL_CLONES 1
#else
#define CPU_KERNEL
#define CPU_KERNEL_CLONES 0
#endif

#define VEC_INLINE inline __attribute__((always_inline))

namespace selective_scan {
namespace cpu {

constexpr int kLanes = 16;
// The alignment is explicit: GCC otherwise gives the type the default target's alignment (16) but assumes 64 in
// AVX-512 code.
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float)), aligned(64)));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t)), aligned(64)));

// A heap array of vectors (std::vector<VecF> would drop the type's alignment attribute).
class VecArray {
 public:
  explicit VecArray(int64_t size) : slots_(new Slot[size]()) {}
  VecF& operator[](int64_t i) { return slots_[i].v; }
  const VecF& operator[](int64_t i) const { return slots_[i].v; }

 private:
  struct alignas(64) Slot {
    VecF v;
  };
  std::unique_ptr<Slot[]> slots_;
};

VEC_INLINE VecF splat(float v) { return VecF{} + v; }
VEC_INLINE VecF vmax(VecF a, VecF b) { return a > b ? a : b; }
VEC_INLINE VecF vmin(VecF a, VecF b) { return a < b ? a : b; }
VEC_INLINE VecF vabs(VecF a) { return a < 0 ? -a : a; }

VEC_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
VEC_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }

// kLanes values of type T at p as fp32; only the first `count` are read, the rest are 0.
template <typename T>
VEC_INLINE VecF load_as_float(const T* p, int count = kLanes) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kLanes) return load(p);
  }
  VecF v{};
  for (int i = 0; i < count; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

// Stores the first `count` lanes of v as T (rounded to nearest even for 16-bit types).
template <typename T>
VEC_INLINE void store_as(T* p, VecF v, int count = kLanes) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kLanes) return store(p, v);
  }
  for (int i = 0; i < count; ++i) p[i] = static_cast<T>(v[i]);
}

#if defined(__GNUC__) && !defined(__clang__)
// One round of the transpose below: rows i and i + kSpan (i without the kSpan bit) swap their off-diagonal
// sub-blocks of kSpan lanes. The shuffle indices count into the concatenation of the two rows.
template <int kSpan>
VEC_INLINE void transpose_round(VecF* rows) {
  constexpr VecI low = {
      (0 & kSpan) ? 16 - kSpan : 0,       (1 & kSpan) ? 17 - kSpan : 1,   (2 & kSpan) ? 18 - kSpan : 2,
      (3 & kSpan) ? 19 - kSpan : 3,       (4 & kSpan) ? 20 - kSpan : 4,   (5 & kSpan) ? 21 - kSpan : 5,
      (6 & kSpan) ? 22 - kSpan : 6,       (7 & kSpan) ? 23 - kSpan : 7,   (8 & kSpan) ? 24 - kSpan : 8,
      (9 & kSpan) ? 25 - kSpan : 9,       (10 & kSpan) ? 26 - kSpan : 10, (11 & kSpan) ? 27 - kSpan : 11,
      (12 & kSpan) ? 28 - kSpan : 12,     (13 & kSpan) ? 29 - kSpan : 13, (14 & kSpan) ? 30 - kSpan : 14,
      (15 & kSpan) ? 31 - kSpan : 15};
  constexpr VecI high = low + kSpan;
  for (int i = 0; i < kLanes; ++i) {
    if (i & kSpan) continue;
    const VecF a = rows[i], b = rows[i + kSpan];
    rows[i] = __builtin_shuffle(a, b, low);
    rows[i + kSpan] = __builtin_shuffle(a, b, high);
  }
}

// Transposes the kLanes x kLanes block rows[0..kLanes): lane j of row i trades places with lane i of row j, in four
// rounds of two-input shuffles (GCC's vector extensions). Out of line: inlined at every tile load and store it
// made the kernels' compile several times slower.
CPU_KERNEL inline void transpose(VecF* rows) {
  static_assert(kLanes == 16, "the rounds are those of a 16 x 16 block");
  transpose_round<8>(rows);
  transpose_round<4>(rows);
  transpose_round<2>(rows);
  transpose_round<1>(rows);
}
#define VEC_HAS_TRANSPOSE 1
#else
#define VEC_HAS_TRANSPOSE 0
#endif

// Sum of the lanes, halving the vector each step.
VEC_INLINE float hsum(VecF v) {
  typedef float Half8 __attribute__((vector_size(8 * sizeof(float))));
  typedef float Half4 __attribute__((vector_size(4 * sizeof(float))));
  Half8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
  const Half8 s8 = lo8 + hi8;
  Half4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof lo4, sizeof hi4);
  const Half4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^x to about 2 ulp: x = n + f with n an integer and |f| <= 1/2, 2^f = 1 + f q(f) with q of degree 5 (fitted
// for relative error, 2e-9 before rounding; exact at f = 0, so decays near 1 carry no bias into long
// recurrences), 2^n from the exponent bits. Saturates below -126 (at 2^-126) and above 127. exp(x) is
// exp2(x log2(e)); its error grows with |x| as exp's own sensitivity to the rounding of x does.
VEC_INLINE VecF vexp2(VecF x) {
  x = vmin(vmax(x, splat(-126.0f)), splat(127.0f));
  const VecF shifted = x + 12582912.0f;  // 1.5 * 2^23: rounds x to an integer held in the low mantissa bits
  const VecF f = x - (shifted - 12582912.0f);
  VecF q = splat(1.5353362e-4f);
  q = q * f + 1.3398875e-3f;
  q = q * f + 9.6184369e-3f;
  q = q * f + 5.5503324e-2f;
  q = q * f + 2.4022648e-1f;
  q = q * f + 6.9314718e-1f;
  VecI bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const VecI scale_bits = (bits + (127 - 0x4B400000)) << 23;
  VecF scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return (q * f + 1.0f) * scale;
}

VEC_INLINE VecF vexp(VecF x) { return vexp2(x * kLog2e); }

// log1p(e) for 0 <= e <= 1 as e q(e), q of degree 8 fitted for relative error (3e-8 before rounding, 2e-7 in
// fp32): no division, and accurate for tiny e.
VEC_INLINE VecF log1p_unit(VecF e) {
  VecF q = splat(5.2326815e-3f);
  q = q * e - 2.9505186e-2f;
  q = q * e + 7.8225866e-2f;
  q = q * e - 1.3663238e-1f;
  q = q * e + 1.9106004e-1f;
  q = q * e - 2.4842980e-1f;
  q = q * e + 3.3319098e-1f;
  q = q * e - 4.9999493e-1f;
  q = q * e + 9.9999994e-1f;
  return q * e;
}

// softplus(z) = max(z, 0) + log1p(exp(-|z|)) (equal in fp32 to log1p(exp(z)) below 20 and to z above, which is
// F.softplus with threshold 20); also its slope sigmoid(z) when `slope` is given.
VEC_INLINE VecF softplus(VecF z, VecF* slope = nullptr) {
  const VecF e = vexp(-vabs(z));
  if (slope) {
    const VecF r = 1.0f / (1.0f + e);
    *slope = z >= 0 ? r : e * r;
  }
  return vmax(z, splat(0.0f)) + log1p_unit(e);
}

}  // namespace cpu
}  // namespace selective_scan
