// The per-element step of abi.h, once per instruction set, chosen at run time (see kernel.h).
//
// The build uses portable flags (no -march=native) and -ffp-contract=off; the wider variants
// come from GCC/Clang target attributes on x86-64 and are picked with __builtin_cpu_supports.
// Other architectures get the one variant their compiler's baseline gives.

#include "kernel.h"

#include <array>
#include <cmath>
#include <cstddef>
#include <utility>

namespace adamx {
namespace {

template <bool kMax, bool kHat, bool kNes, bool kDecay>
inline __attribute__((always_inline)) void StepBody(const Leaf& l, int64_t lo, int64_t hi,
                                                    const float* s) {
  const float scale = s[scalar::scale], b1 = s[scalar::b1], omb1 = s[scalar::omb1];
  const float b2 = s[scalar::b2], omb2 = s[scalar::omb2], eps = s[scalar::eps];
  const float eps_root = s[scalar::eps_root], wd = s[scalar::weight_decay];
  const float inv_bc1 = s[scalar::inv_bc1], inv_bc2 = s[scalar::inv_bc2];
  const float step_scale = s[scalar::step_scale];
  const float nesterov_m = s[scalar::nesterov_m], nesterov_g = s[scalar::nesterov_g];
  const float *p_in = l.p_in, *g_in = l.g, *m_in = l.m_in, *v_in = l.v_in;
  float *p_out = l.p, *m_out = l.m, *v_out = l.v;
  // Outputs may alias inputs element for element (in place), never across elements.
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float g = kMax ? -g_in[i] : g_in[i];
    const float m = omb1 * g + b1 * m_in[i];
    const float v = omb2 * (g * g) + b2 * v_in[i];
    const float p = p_in[i];
    m_out[i] = m;
    v_out[i] = v;
    const float m_hat = kNes ? nesterov_m * m + nesterov_g * g : m * inv_bc1;
    float d;
    if (kHat) {
      d = m_hat * (step_scale / (std::sqrt(v + eps_root) + eps));
    } else {
      d = m_hat / (std::sqrt(v * inv_bc2 + eps_root) + eps);
    }
    if (kDecay) d = d + wd * p;
    p_out[i] = p + scale * d;
  }
}

// One instruction-set variant: Variant<isa>::Step<...> is StepBody compiled for that set.
enum Isa : int {
  kBaseline,
#if defined(__x86_64__)
  kAvx2,
  kAvx512,
#endif
  kNumIsas
};

template <int kIsa>
struct Variant;

template <>
struct Variant<kBaseline> {
  static constexpr const char* kName = "baseline";
  template <bool kMax, bool kHat, bool kNes, bool kDecay>
  static void Step(const Leaf& l, int64_t lo, int64_t hi, const float* s) {
    StepBody<kMax, kHat, kNes, kDecay>(l, lo, hi, s);
  }
};

#if defined(__x86_64__)
template <>
struct Variant<kAvx2> {
  static constexpr const char* kName = "avx2";
  template <bool kMax, bool kHat, bool kNes, bool kDecay>
  __attribute__((target("avx2"))) static void Step(const Leaf& l, int64_t lo, int64_t hi,
                                                   const float* s) {
    StepBody<kMax, kHat, kNes, kDecay>(l, lo, hi, s);
  }
};

#if defined(__clang__)
#define ADAMX_AVX512 __attribute__((target("avx512f"), min_vector_width(512)))
#else
#define ADAMX_AVX512 __attribute__((target("avx512f,prefer-vector-width=512")))
#endif

template <>
struct Variant<kAvx512> {
  static constexpr const char* kName = "avx512f";
  template <bool kMax, bool kHat, bool kNes, bool kDecay>
  ADAMX_AVX512 static void Step(const Leaf& l, int64_t lo, int64_t hi, const float* s) {
    StepBody<kMax, kHat, kNes, kDecay>(l, lo, hi, s);
  }
};
#endif  // __x86_64__

static_assert((flag::kAll & (flag::kAll + 1)) == 0, "abi.h: flag bits must be 0, 1, 2, ...");
constexpr size_t kNumFlagSets = static_cast<size_t>(flag::kAll) + 1;

// Entry 2 * flags + decay of one variant's table.
template <int kIsa, size_t kEntry>
constexpr StepFn Entry() {
  constexpr int64_t flags = static_cast<int64_t>(kEntry / 2);
  return &Variant<kIsa>::template Step<(flags & flag::maximize) != 0, (flags & flag::eps_hat) != 0,
                                       (flags & flag::nesterov) != 0, kEntry % 2 == 1>;
}

template <int kIsa, size_t... kEntries>
constexpr std::array<StepFn, 2 * kNumFlagSets> Table(std::index_sequence<kEntries...>) {
  return {Entry<kIsa, kEntries>()...};
}

template <size_t... kIsas>
constexpr std::array<std::array<StepFn, 2 * kNumFlagSets>, kNumIsas> Tables(
    std::index_sequence<kIsas...>) {
  return {Table<kIsas>(std::make_index_sequence<2 * kNumFlagSets>())...};
}

constexpr auto kSteps = Tables(std::make_index_sequence<kNumIsas>());

template <size_t... kIsas>
constexpr std::array<const char*, kNumIsas> Names(std::index_sequence<kIsas...>) {
  return {Variant<kIsas>::kName...};
}

constexpr auto kNames = Names(std::make_index_sequence<kNumIsas>());

bool Supported(int isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case kAvx2:
      return __builtin_cpu_supports("avx2");
    case kAvx512:
      return __builtin_cpu_supports("avx512f");
    default:
      break;
  }
#endif
  return isa == kBaseline;
}

}  // namespace

int NumIsas() { return kNumIsas; }

const char* IsaName(int isa) { return kNames[isa]; }

bool IsaSupported(int isa) { return isa >= 0 && isa < kNumIsas && Supported(isa); }

int BestIsa() {
  static const int best = [] {
    int isa = kNumIsas - 1;
    while (isa > kBaseline && !Supported(isa)) --isa;
    return isa;
  }();
  return best;
}

StepFn PickStep(int isa, int64_t flags, bool decay) {
  return kSteps[isa][2 * static_cast<size_t>(flags & flag::kAll) + (decay ? 1 : 0)];
}

}  // namespace adamx
