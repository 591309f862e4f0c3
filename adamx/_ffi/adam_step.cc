// One Adam step over every float32 leaf of a pytree in a single XLA:CPU custom call.
//
// Operands: a float32 vector of step scalars (see kScale..kNesterovG below), then for each leaf
// its param, grad, first moment and second moment. Results: for each leaf its new param, first
// moment and second moment; the caller aliases them to the operands so the step runs in place.
// The arithmetic is the per-element sequence of adamx/_update.py, operation for operation in
// float32, with division by a bias correction done as multiplication by its reciprocal (as
// XLA's algebraic simplifier rewrites the plain path). Results agree with the plain path to a
// few float32 ulp: GCC and XLA's LLVM each choose where to contract a multiply-add into an FMA.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Scalar {
  kScale, kB1, kOmb1, kB2, kOmb2, kEps, kEpsRoot, kWeightDecay, kInvBc1, kInvBc2, kStepScale,
  kNesterovM, kNesterovG, kNumScalars
};
enum Flag { kMaximize = 1, kEpsHat = 2, kNesterov = 4 };

using ScalarBuffer = ffi::Buffer<ffi::F32, 1>;

struct Leaf {
  const float* p_in;
  const float* g;
  const float* m_in;
  const float* v_in;
  float* p;
  float* m;
  float* v;
  int64_t size;
  bool decay;
};

// Leaves laid end to end: element i of the step lies in the leaf k with starts[k] <= i < starts[k+1].
struct Layout {
  std::vector<int64_t> starts{0};
  void Add(int64_t size) { starts.push_back(starts.back() + size); }
  int64_t total() const { return starts.back(); }
};

// Shared by the calling thread and the pool's helpers: each claims chunks until none are left.
struct Job {
  std::function<void(int64_t, int64_t)> run;  // runs global elements [lo, hi)
  int64_t total = 0;
  int64_t chunk = 1;
  int64_t num_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      run(c * chunk, std::min(total, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs run(lo, hi) over [0, total) in chunks on the calling thread and XLA's intra-op pool;
// returns when every chunk is finished.
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk,
                 std::function<void(int64_t, int64_t)> run) {
  auto job = std::make_shared<Job>();
  job->run = std::move(run);
  job->total = total;
  job->chunk = std::max<int64_t>(chunk, 1);
  job->num_chunks = (total + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([job] { job->Drain(); });
  }
  job->Drain();
  // Chunks still counted as not done were claimed by helpers that are running them now.
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) {
    std::this_thread::yield();
  }
}

// Calls fn(k, begin, end) for the part [begin, end) of each leaf k that global [lo, hi) covers.
template <typename Fn>
void ForLeaves(const Layout& layout, int64_t lo, int64_t hi, Fn fn) {
  const auto& starts = layout.starts;
  auto it = std::upper_bound(starts.begin(), starts.end(), lo);
  size_t k = static_cast<size_t>(it - starts.begin()) - 1;
  while (lo < hi && k + 1 < starts.size()) {
    const int64_t end = std::min(hi, starts[k + 1]);
    fn(k, lo - starts[k], end - starts[k]);
    lo = end;
    ++k;
  }
}

template <bool kMax, bool kHat, bool kNes, bool kDecay>
void Kernel(const Leaf& l, int64_t lo, int64_t hi, const float* s) {
  const float scale = s[kScale], b1 = s[kB1], omb1 = s[kOmb1], b2 = s[kB2], omb2 = s[kOmb2];
  const float eps = s[kEps], eps_root = s[kEpsRoot], wd = s[kWeightDecay];
  const float inv_bc1 = s[kInvBc1], inv_bc2 = s[kInvBc2], step_scale = s[kStepScale];
  const float nes_m = s[kNesterovM], nes_g = s[kNesterovG];
  const float *p_in = l.p_in, *g_in = l.g, *m_in = l.m_in, *v_in = l.v_in;
  float *p_out = l.p, *m_out = l.m, *v_out = l.v;
  // Outputs may alias inputs element for element (in place), never across elements.
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float g = kMax ? -g_in[i] : g_in[i];
    const float m = omb1 * g + b1 * m_in[i];
    const float v = omb2 * (g * g) + b2 * v_in[i];
    m_out[i] = m;
    v_out[i] = v;
    const float p = p_in[i];
    const float m_hat = kNes ? nes_m * m + nes_g * g : m * inv_bc1;
    float direction;
    if (kHat) {
      direction = m_hat * (step_scale / (std::sqrt(v + eps_root) + eps));
    } else {
      direction = m_hat / (std::sqrt(v * inv_bc2 + eps_root) + eps);
    }
    if (kDecay) direction = direction + wd * p;
    p_out[i] = p + scale * direction;
  }
}

using KernelFn = void (*)(const Leaf&, int64_t, int64_t, const float*);

template <bool kMax, bool kHat, bool kNes>
KernelFn Pick3(bool decay) {
  return decay ? Kernel<kMax, kHat, kNes, true> : Kernel<kMax, kHat, kNes, false>;
}

template <bool kMax, bool kHat>
KernelFn Pick2(int64_t flags, bool decay) {
  return (flags & kNesterov) ? Pick3<kMax, kHat, true>(decay) : Pick3<kMax, kHat, false>(decay);
}

template <bool kMax>
KernelFn Pick1(int64_t flags, bool decay) {
  return (flags & kEpsHat) ? Pick2<kMax, true>(flags, decay) : Pick2<kMax, false>(flags, decay);
}

KernelFn Pick(int64_t flags, bool decay) {
  return (flags & kMaximize) ? Pick1<true>(flags, decay) : Pick1<false>(flags, decay);
}

// Leaf k's kIn operands and kOut results as float pointers; fails unless every one decodes and the
// operands are float32 buffers of one size, which goes to *size.
template <size_t kIn, size_t kOut>
ffi::Error DecodeLeaf(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets, size_t k,
                      const float* (&in)[kIn], float* (&out)[kOut], int64_t* size) {
  *size = -1;
  for (size_t i = 0; i < kIn; ++i) {
    auto b = args.get<ffi::AnyBuffer>(kIn * k + i);
    if (!b) return ffi::Error::InvalidArgument("adamx: could not decode an operand");
    const auto count = static_cast<int64_t>(b->element_count());
    if (b->element_type() != ffi::F32 || (*size >= 0 && count != *size)) {
      return ffi::Error::InvalidArgument("adamx: a leaf's buffers must be float32, same size");
    }
    *size = count;
    in[i] = static_cast<const float*>(b->untyped_data());
  }
  for (size_t i = 0; i < kOut; ++i) {
    auto b = rets.get<ffi::AnyBuffer>(kOut * k + i);
    if (!b) return ffi::Error::InvalidArgument("adamx: could not decode a result");
    out[i] = static_cast<float*>((*b)->untyped_data());
  }
  return ffi::Error::Success();
}

ffi::Error AdamStepImpl(ffi::ThreadPool pool, ScalarBuffer scalars,
                        ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t flags,
                        ffi::Span<const int32_t> decay, int64_t chunk) {
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("adamx adam_step: wrong number of step scalars");
  }
  const size_t n = decay.size();
  if (args.size() != 4 * n || rets.size() != 3 * n) {
    return ffi::Error::InvalidArgument("adamx adam_step: operands do not match the leaf count");
  }
  std::vector<Leaf> leaves;
  leaves.reserve(n);
  Layout layout;
  float s[kNumScalars];
  std::copy(scalars.typed_data(), scalars.typed_data() + kNumScalars, s);
  for (size_t k = 0; k < n; ++k) {
    const float* in[4];  // p, g, m, v
    float* out[3];       // p, m, v
    int64_t size;
    if (auto e = DecodeLeaf(args, rets, k, in, out, &size); !e.success()) return e;
    leaves.push_back(Leaf{in[0], in[1], in[2], in[3], out[0], out[1], out[2], size, decay[k] != 0});
    layout.Add(size);
  }
  ParallelFor(pool, layout.total(), chunk, [&](int64_t lo, int64_t hi) {
    ForLeaves(layout, lo, hi, [&](size_t k, int64_t begin, int64_t end) {
      Pick(flags, leaves[k].decay)(leaves[k], begin, end, s);
    });
  });
  return ffi::Error::Success();
}

// The moments alone, for the Optax protocol (the update itself is left to XLA, which fuses it
// into optax.apply_updates). The same expressions as the plain JAX path; with constant
// hyperparameters GCC and XLA's LLVM contract them into the same FMAs (the same bits). Operands: a float32 vector [b1, 1 - b1, b2, 1 - b2], then for each
// leaf its grad, first moment and second moment; results: each leaf's new first and second
// moment, aliased by the caller to the old ones.
enum MomentScalar { kMB1, kMOmb1, kMB2, kMOmb2, kNumMomentScalars };

struct MomentLeaf {
  const float* g;
  const float* m_in;
  const float* v_in;
  float* m;
  float* v;
};

void MomentKernel(const MomentLeaf& l, int64_t lo, int64_t hi, const float* s) {
  const float b1 = s[kMB1], omb1 = s[kMOmb1], b2 = s[kMB2], omb2 = s[kMOmb2];
  const float *g_in = l.g, *m_in = l.m_in, *v_in = l.v_in;
  float *m_out = l.m, *v_out = l.v;
#pragma GCC ivdep
  for (int64_t i = lo; i < hi; ++i) {
    const float g = g_in[i];
    m_out[i] = omb1 * g + b1 * m_in[i];
    v_out[i] = omb2 * (g * g) + b2 * v_in[i];
  }
}

ffi::Error AdamMomentsImpl(ffi::ThreadPool pool, ScalarBuffer scalars, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int64_t chunk) {
  if (scalars.element_count() != kNumMomentScalars) {
    return ffi::Error::InvalidArgument("adamx adam_moments: wrong number of scalars");
  }
  const size_t n = args.size() / 3;
  if (args.size() != 3 * n || rets.size() != 2 * n) {
    return ffi::Error::InvalidArgument("adamx adam_moments: operands do not match the leaves");
  }
  std::vector<MomentLeaf> leaves;
  leaves.reserve(n);
  Layout layout;
  float s[kNumMomentScalars];
  std::copy(scalars.typed_data(), scalars.typed_data() + kNumMomentScalars, s);
  for (size_t k = 0; k < n; ++k) {
    const float* in[3];  // g, m, v
    float* out[2];       // m, v
    int64_t size;
    if (auto e = DecodeLeaf(args, rets, k, in, out, &size); !e.success()) return e;
    leaves.push_back(MomentLeaf{in[0], in[1], in[2], out[0], out[1]});
    layout.Add(size);
  }
  ParallelFor(pool, layout.total(), chunk, [&](int64_t lo, int64_t hi) {
    ForLeaves(layout, lo, hi, [&](size_t k, int64_t begin, int64_t end) {
      MomentKernel(leaves[k], begin, end, s);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxAdamStepF32, AdamStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ScalarBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("flags")
                                  .Attr<ffi::Span<const int32_t>>("decay")
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxAdamMomentsF32, AdamMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ScalarBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("chunk"));
