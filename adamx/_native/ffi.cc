// The XLA:CPU FFI handler of the custom call in abi.h: one Adam step over many float32 leaves.
//
// It decodes the leaves' buffers, splits their elements (laid end to end) into chunks, and runs
// the chunks on the calling thread and XLA's intra-op thread pool with the kernel variant that
// this CPU runs best (kernel.h). Each element is computed by the same code whichever thread or
// chunk it falls in, so the split never changes a bit.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "abi.h"
#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace adamx {
namespace {

using ScalarBuffer = ffi::Buffer<ffi::F32, 1>;

// Below this many elements a step runs on the calling thread alone: waking helpers costs more.
constexpr int64_t kMinParallel = int64_t{1} << 16;
// Work items per thread, so a thread slowed by other load leaves its share to the others.
constexpr int64_t kChunksPerThread = 4;
// Chunks are whole multiples of this many elements (1 KiB of each buffer), so a step of one leaf
// splits on cache-line boundaries and no two threads write to one line.
constexpr int64_t kChunkAlign = 256;

// The step over the leaves laid end to end: global element i lies in leaf k with
// starts[k] <= i < starts[k + 1].
struct Step {
  std::vector<Leaf> leaves;
  std::vector<int64_t> starts{0};
  std::vector<StepFn> fns;  // per leaf
  float s[scalar::kCount];

  // Runs global elements [lo, hi).
  void Run(int64_t lo, int64_t hi) const {
    size_t k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) -
                                   starts.begin()) - 1;
    for (; lo < hi; ++k) {
      const int64_t end = std::min(hi, starts[k + 1]);
      fns[k](leaves[k], lo - starts[k], end - starts[k], s);
      lo = end;
    }
  }
};

// Shared by the calling thread and the pool's helpers: each claims chunks until none are left.
struct Job {
  const Step* step;
  int64_t total, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      step->Run(c * chunk, std::min(total, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void RunParallel(ffi::ThreadPool& pool, const Step& step) {
  const int64_t total = step.starts.back();
  const int64_t threads = static_cast<int64_t>(pool.num_threads()) + 1;  // with the caller
  if (total < kMinParallel || threads == 1) {
    step.Run(0, total);
    return;
  }
  auto job = std::make_shared<Job>();
  job->step = &step;
  job->total = total;
  const int64_t per_chunk = (total + threads * kChunksPerThread - 1) / (threads * kChunksPerThread);
  job->chunk = (per_chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  job->num_chunks = (total + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min(threads - 1, job->num_chunks - 1);
  // A helper that starts after every chunk is claimed finds none and returns at once; the job
  // outlives this call through the shared pointer, while `step` is only touched for a claimed
  // chunk, which the wait below covers.
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([job] { job->Drain(); });
  }
  job->Drain();
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) {
    std::this_thread::yield();
  }
}

ffi::Error StepImpl(ffi::ThreadPool pool, ScalarBuffer scalars,
                    ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t flags,
                    ffi::Span<const int32_t> decay) {
  if (scalars.element_count() != scalar::kCount) {
    return ffi::Error::InvalidArgument("adamx adam_step: wrong number of step scalars");
  }
  if ((flags & ~flag::kAll) != 0) {
    return ffi::Error::InvalidArgument("adamx adam_step: unknown flag bits");
  }
  const size_t n = decay.size();
  if (args.size() != 4 * n || rets.size() != 3 * n) {
    return ffi::Error::InvalidArgument("adamx adam_step: operands do not match the leaf count");
  }
  Step step;
  std::copy(scalars.typed_data(), scalars.typed_data() + scalar::kCount, step.s);
  step.leaves.reserve(n);
  step.fns.reserve(n);
  const int isa = BestIsa();
  for (size_t k = 0; k < n; ++k) {
    const float* in[4];  // p, g, m, v
    float* out[3];       // p, m, v
    int64_t size = -1;
    for (size_t i = 0; i < 4; ++i) {
      auto b = args.get<ffi::AnyBuffer>(4 * k + i);
      if (!b) return ffi::Error::InvalidArgument("adamx adam_step: could not decode an operand");
      const auto count = static_cast<int64_t>(b->element_count());
      if (b->element_type() != ffi::F32 || (size >= 0 && count != size)) {
        return ffi::Error::InvalidArgument(
            "adamx adam_step: a leaf's p, g, m, v must be float32 of one size");
      }
      size = count;
      in[i] = static_cast<const float*>(b->untyped_data());
    }
    for (size_t i = 0; i < 3; ++i) {
      auto b = rets.get<ffi::AnyBuffer>(3 * k + i);
      if (!b || (*b)->element_type() != ffi::F32 ||
          static_cast<int64_t>((*b)->element_count()) != size) {
        return ffi::Error::InvalidArgument("adamx adam_step: a result does not match its leaf");
      }
      out[i] = static_cast<float*>((*b)->untyped_data());
    }
    step.leaves.push_back(Leaf{in[0], in[1], in[2], in[3], out[0], out[1], out[2]});
    step.fns.push_back(PickStep(isa, flags, decay[k] != 0));
    step.starts.push_back(step.starts.back() + size);
  }
  RunParallel(pool, step);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace adamx

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxAdamStepF32, adamx::StepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<adamx::ScalarBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("flags")
                                  .Attr<ffi::Span<const int32_t>>("decay"));
