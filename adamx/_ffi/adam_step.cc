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

struct Work {
  std::vector<Leaf> leaves;
  std::vector<int64_t> starts;  // global element offset of each leaf; one extra at the end
  float s[kNumScalars];
  int64_t flags;
  int64_t chunk;
  int64_t num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

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

// Runs global elements [lo, hi), which may span several leaves.
void RunRange(const Work& w, int64_t lo, int64_t hi) {
  auto it = std::upper_bound(w.starts.begin(), w.starts.end(), lo);
  size_t k = static_cast<size_t>(it - w.starts.begin()) - 1;
  while (lo < hi && k < w.leaves.size()) {
    const Leaf& l = w.leaves[k];
    const int64_t begin = lo - w.starts[k];
    const int64_t end = std::min(hi, w.starts[k + 1]) - w.starts[k];
    Pick(w.flags, l.decay)(l, begin, end, w.s);
    lo = w.starts[k] + end;
    ++k;
  }
}

// Claims chunks until none are left; returns after finishing the ones it claimed.
void Drain(Work& w) {
  const int64_t total = w.starts.back();
  for (;;) {
    const int64_t c = w.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= w.num_chunks) return;
    RunRange(w, c * w.chunk, std::min(total, (c + 1) * w.chunk));
    w.done.fetch_add(1, std::memory_order_release);
  }
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
  auto w = std::make_shared<Work>();
  w->leaves.reserve(n);
  w->starts.reserve(n + 1);
  w->starts.push_back(0);
  std::copy(scalars.typed_data(), scalars.typed_data() + kNumScalars, w->s);
  w->flags = flags;
  for (size_t k = 0; k < n; ++k) {
    auto p = args.get<ffi::AnyBuffer>(4 * k);
    auto g = args.get<ffi::AnyBuffer>(4 * k + 1);
    auto m = args.get<ffi::AnyBuffer>(4 * k + 2);
    auto v = args.get<ffi::AnyBuffer>(4 * k + 3);
    auto po = rets.get<ffi::AnyBuffer>(3 * k);
    auto mo = rets.get<ffi::AnyBuffer>(3 * k + 1);
    auto vo = rets.get<ffi::AnyBuffer>(3 * k + 2);
    if (!p || !g || !m || !v || !po || !mo || !vo) {
      return ffi::Error::InvalidArgument("adamx adam_step: could not decode a buffer");
    }
    const int64_t size = static_cast<int64_t>(p->element_count());
    for (const auto* b : {&*p, &*g, &*m, &*v}) {
      if (b->element_type() != ffi::F32 || static_cast<int64_t>(b->element_count()) != size) {
        return ffi::Error::InvalidArgument("adamx adam_step: leaves must be float32, same size");
      }
    }
    w->leaves.push_back(Leaf{
        static_cast<const float*>(p->untyped_data()), static_cast<const float*>(g->untyped_data()),
        static_cast<const float*>(m->untyped_data()), static_cast<const float*>(v->untyped_data()),
        static_cast<float*>((*po)->untyped_data()), static_cast<float*>((*mo)->untyped_data()),
        static_cast<float*>((*vo)->untyped_data()), size, decay[k] != 0});
    w->starts.push_back(w->starts.back() + size);
  }
  const int64_t total = w->starts.back();
  w->chunk = std::max<int64_t>(chunk, 1);
  w->num_chunks = (total + w->chunk - 1) / w->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), w->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([w] { Drain(*w); });
  }
  Drain(*w);
  // Chunks still counted as not done were claimed by helpers that are running them now.
  while (w->done.load(std::memory_order_acquire) < w->num_chunks) {
    std::this_thread::yield();
  }
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
