// The XLA:CPU FFI handler of the custom call in abi.h: one Adam step over many leaves.
//
// It checks the operands against the ABI, describes each leaf (kernel.h), splits the leaves'
// elements into tasks, and runs the tasks on the calling thread and XLA's intra-op thread pool,
// then waits for the pool's share without spinning. A leaf with an int4_rank1 second moment
// first needs its new row and column scales: a pass over its rows runs before the step, the
// same way. Each element is computed by the same code whichever thread or task it falls in, and
// a split never cuts a block or a byte, so the split never changes a bit.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "abi.h"
#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace adamx {
namespace {

// Below this many elements a step runs on the calling thread alone: waking helpers costs more.
constexpr int64_t kMinParallel = int64_t{1} << 16;
// Tasks per thread, so that a thread slowed by other load leaves its share to the others.
constexpr int64_t kTasksPerThread = 4;
// Pieces of a leaf are whole multiples of this many elements where its format allows (1 KiB of
// a float32 buffer), so that no two threads write to one cache line.
constexpr int64_t kAlign = 256;

// Runs fn(i) for i in [0, count) on the calling thread and `helpers` tasks of the pool; returns
// when every fn(i) has returned. Helpers that start after every index is claimed return at once.
// The caller only waits for indices that a running helper has claimed, so it cannot wait on a
// helper that never starts.
void ParallelFor(ffi::ThreadPool& pool, int64_t helpers, int64_t count,
                 const std::function<void(int64_t)>& fn) {
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t count = 0;
    const std::function<void(int64_t)>* fn = nullptr;  // touched for claimed indices only
    std::mutex mutex;
    std::condition_variable finished;

    void Drain() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
        (*fn)(i);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
          const std::lock_guard<std::mutex> lock(mutex);
          finished.notify_all();
        }
      }
    }
  };
  auto job = std::make_shared<Job>();
  job->count = count;
  job->fn = &fn;
  for (int64_t t = 0; t < std::min(helpers, count - 1); ++t) {
    pool.Schedule([job] { job->Drain(); });
  }
  job->Drain();
  std::unique_lock<std::mutex> lock(job->mutex);
  job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == count; });
}

// Reads a leaf's operands and results in ABI order, checking each.
class Reader {
 public:
  Reader(ffi::RemainingArgs& args, ffi::RemainingRets& rets) : args_(args), rets_(rets) {}

  // The next operand, which has no result (the grad).
  bool Input(ffi::DataType dtype, int64_t count, const char* what, const void** data) {
    const auto buffer = Next(dtype, count, what);
    if (!buffer) return false;
    *data = buffer->untyped_data();
    return true;
  }

  // The next operand and its result, which must match it.
  bool InOut(ffi::DataType dtype, int64_t count, const char* what, const void** in, void** out) {
    const auto buffer = Next(dtype, count, what);
    if (!buffer) return false;
    *in = buffer->untyped_data();
    auto result = rets_.get<ffi::AnyBuffer>(ret_++);
    if (!result || (*result)->element_type() != dtype ||
        (*result)->element_count() != buffer->element_count()) {
      return Fail(std::string("the result of ") + what + " does not match its operand");
    }
    *out = (*result)->untyped_data();
    return true;
  }

  // The dimensions of the last operand read.
  ffi::Span<const int64_t> dims() const { return dims_; }

  bool Fail(std::string why) {
    error_ = "adamx adam_step: leaf " + std::to_string(leaf_) + ": " + std::move(why);
    return false;
  }

  void StartLeaf(size_t leaf) { leaf_ = leaf; }
  bool AllRead() const { return arg_ == args_.size() && ret_ == rets_.size(); }
  const std::string& error() const { return error_; }

 private:
  // The next operand, checked; none (and the error set) if it does not fit.
  std::optional<ffi::AnyBuffer> Next(ffi::DataType dtype, int64_t count, const char* what) {
    if (arg_ >= args_.size()) return Missing(std::string("missing the operand ") + what);
    auto b = args_.get<ffi::AnyBuffer>(arg_++);
    if (!b) return Missing(std::string("could not decode ") + what);
    if (b->element_type() != dtype) return Missing(std::string(what) + " has the wrong dtype");
    if (count >= 0 && static_cast<int64_t>(b->element_count()) != count) {
      return Missing(std::string(what) + " has " + std::to_string(b->element_count()) +
                     " elements where " + std::to_string(count) + " are needed");
    }
    dims_ = b->dimensions();
    return *b;
  }

  std::optional<ffi::AnyBuffer> Missing(std::string why) {
    Fail(std::move(why));
    return std::nullopt;
  }

  ffi::RemainingArgs& args_;
  ffi::RemainingRets& rets_;
  size_t arg_ = 0, ret_ = 0, leaf_ = 0;
  ffi::Span<const int64_t> dims_{nullptr, 0};
  std::string error_;
};

using Scalars = ffi::Buffer<ffi::F32, 1>;
using Keys = ffi::Buffer<ffi::U32, 1>;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Reads one moment's arrays (abi.h's ADAMX_MOMENT_FORMATS) into mo.
bool ReadMoment(Reader& r, const Leaf& leaf, int64_t rank, bool first, int64_t fmt,
                int64_t block, Moment* mo) {
  const char* name = first ? "mu" : "nu";
  mo->format = static_cast<int>(fmt);
  mo->block = block;
  const int64_t size = leaf.size;
  auto blocks = [&](const char* what) {
    if (block < 1) return r.Fail(std::string(what) + ": a block length must be positive");
    return true;
  };
  switch (fmt) {
    case format::float32:
      return r.InOut(ffi::F32, size, name, &mo->in[0], &mo->out[0]);
    case format::bfloat16:
      return r.InOut(ffi::BF16, size, name, &mo->in[0], &mo->out[0]);
    case format::int8_blocks:
      return blocks(name) &&
             r.InOut(first ? ffi::S8 : ffi::U8, size, "int8 codes", &mo->in[0], &mo->out[0]) &&
             r.InOut(ffi::F32, CeilDiv(size, block), "int8 absmax", &mo->in[1], &mo->out[1]);
    case format::int4_blocks:
      if (!first) return r.Fail("int4_blocks is a first-moment format");
      if (rank < 1 || leaf.cols % 2 || block % 2) {
        return r.Fail("int4_blocks needs an even last dimension and an even block length");
      }
      return blocks(name) &&
             r.InOut(ffi::S8, size / 2, "int4 codes", &mo->in[0], &mo->out[0]) &&
             r.InOut(ffi::BF16, CeilDiv(size, block), "int4 absmax", &mo->in[1], &mo->out[1]);
    case format::int4_rank1: {
      if (first) return r.Fail("int4_rank1 is a second-moment format");
      if (rank < 2) return r.Fail("int4_rank1 needs a leaf of two or more dimensions");
      const int64_t rows = size / leaf.cols;
      return r.InOut(ffi::U8, rows * ((leaf.cols + 1) / 2), "rank-1 codes", &mo->in[0],
                     &mo->out[0]) &&
             r.InOut(ffi::F32, rows, "row_max", &mo->in[1], &mo->out[1]) &&
             r.InOut(ffi::F32, leaf.cols, "col_max", &mo->in[2], &mo->out[2]);
    }
    default:
      return r.Fail(std::string("unknown format of ") + name);
  }
}

// Reads leaf k: its fields, operands and results.
bool ReadLeaf(Reader& r, const int64_t* f, const uint32_t* keys, Leaf* leaf) {
  if (f[field::param] != param::float32 && f[field::param] != param::bfloat16) {
    return r.Fail("unknown param dtype");
  }
  leaf->param = static_cast<int>(f[field::param]);
  leaf->rounding = static_cast<int>(f[field::rounding]);
  if (leaf->rounding < rounding::nearest || leaf->rounding > rounding::kahan ||
      (leaf->param == param::float32 && leaf->rounding != rounding::nearest)) {
    return r.Fail("the rounding does not fit the param's dtype");
  }
  leaf->decay = f[field::decay] != 0;
  leaf->key_param = keys[0];
  leaf->key_moments = keys[1];
  const ffi::DataType dtype = leaf->param == param::float32 ? ffi::F32 : ffi::BF16;
  if (!r.InOut(dtype, -1, "p", &leaf->p_in, &leaf->p_out)) return false;
  const auto dims = r.dims();
  const int64_t rank = static_cast<int64_t>(dims.size());
  leaf->size = 1;
  for (int64_t d : dims) leaf->size *= d;
  leaf->cols = rank ? dims.back() : 1;
  if (!r.Input(dtype, leaf->size, "g", &leaf->g)) return false;
  if (!ReadMoment(r, *leaf, rank, true, f[field::mu], f[field::mu_block], &leaf->mu) ||
      !ReadMoment(r, *leaf, rank, false, f[field::nu], f[field::nu_block], &leaf->nu)) {
    return false;
  }
  if (leaf->rounding == rounding::kahan) {
    const void* in;
    void* out;
    if (!r.InOut(ffi::BF16, leaf->size, "compensation", &in, &out)) return false;
    leaf->c_in = static_cast<const uint16_t*>(in);
    leaf->c_out = static_cast<uint16_t*>(out);
  }
  return true;
}

// The new scales of an int4_rank1 second moment, kept apart until the step has decoded the old.
struct Rank1 {
  Leaf* leaf;
  std::vector<uint32_t> row_peak;
  std::unique_ptr<std::atomic<uint32_t>[]> col_peak;
  std::vector<float> row, col, inv_row, inv_col;
};

// A piece of a leaf's elements (or, for Rank1Peaks, of its rows).
struct Piece {
  size_t leaf;
  int64_t lo, hi;
};

// Cuts [0, total) of each leaf into pieces of about `target` (multiples of `unit(k)`), and groups
// consecutive pieces into tasks of at least `target`. Returns the tasks' first pieces (and the
// end).
template <typename Units>
std::vector<size_t> Split(const std::vector<int64_t>& totals, Units unit, int64_t target,
                          std::vector<Piece>* pieces) {
  std::vector<size_t> starts{0};
  int64_t filled = 0;
  for (size_t k = 0; k < totals.size(); ++k) {
    const int64_t step = CeilDiv(target, unit(k)) * unit(k);
    for (int64_t lo = 0; lo < totals[k]; lo += step) {
      const int64_t hi = std::min(totals[k], lo + step);
      pieces->push_back({k, lo, hi});
      filled += hi - lo;
      if (filled >= target) {
        starts.push_back(pieces->size());
        filled = 0;
      }
    }
  }
  if (starts.back() != pieces->size()) starts.push_back(pieces->size());
  return starts;
}

ffi::Error StepImpl(ffi::ThreadPool pool, Scalars scalars, Keys keys, ffi::RemainingArgs args,
                    ffi::RemainingRets rets, int64_t flags, ffi::Span<const int64_t> fields,
                    int64_t isa) {
  if (scalars.element_count() != scalar::kCount) {
    return ffi::Error::InvalidArgument("adamx adam_step: wrong number of step scalars");
  }
  if ((flags & ~flag::kAll) != 0) {
    return ffi::Error::InvalidArgument("adamx adam_step: unknown flag bits");
  }
  if (isa != -1 && (isa < 0 || isa >= NumIsas() || !IsaSupported(static_cast<int>(isa)))) {
    return ffi::Error::InvalidArgument("adamx adam_step: this CPU cannot run that variant");
  }
  if (fields.size() % field::kCount != 0 ||
      keys.element_count() != 2 * (fields.size() / field::kCount)) {
    return ffi::Error::InvalidArgument("adamx adam_step: leaves and keys do not match");
  }
  const size_t n = fields.size() / field::kCount;
  std::vector<Leaf> leaves(n);
  Reader reader(args, rets);
  for (size_t k = 0; k < n; ++k) {
    reader.StartLeaf(k);
    if (!ReadLeaf(reader, fields.begin() + k * field::kCount, keys.typed_data() + 2 * k,
                  &leaves[k])) {
      return ffi::Error::InvalidArgument(reader.error());
    }
  }
  if (!reader.AllRead()) {
    return ffi::Error::InvalidArgument("adamx adam_step: more operands or results than leaves");
  }
  const float* s = scalars.typed_data();
  const Kernels& kernels = KernelsFor(isa == -1 ? BestIsa() : static_cast<int>(isa));

  int64_t total = 0;
  std::vector<int64_t> sizes(n), rows;
  std::vector<Rank1> rank1;
  for (size_t k = 0; k < n; ++k) {
    sizes[k] = leaves[k].size;
    total += sizes[k];
    if (HasRank1(leaves[k]) && leaves[k].size) {
      Leaf& leaf = leaves[k];
      const int64_t r = leaf.size / leaf.cols;
      Rank1 state{&leaf, std::vector<uint32_t>(r), nullptr, std::vector<float>(r),
                  std::vector<float>(leaf.cols), std::vector<float>(r),
                  std::vector<float>(leaf.cols)};
      state.col_peak.reset(new std::atomic<uint32_t>[leaf.cols]);
      for (int64_t c = 0; c < leaf.cols; ++c) state.col_peak[c].store(0);
      leaf.old_row = static_cast<const float*>(leaf.nu.in[1]);
      leaf.old_col = static_cast<const float*>(leaf.nu.in[2]);
      leaf.inv_row = state.inv_row.data();
      leaf.inv_col = state.inv_col.data();
      rows.push_back(r);
      rank1.push_back(std::move(state));
    }
  }
  const int64_t workers = total < kMinParallel ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int64_t target = std::max(kAlign, CeilDiv(total, workers * kTasksPerThread));

  if (!rank1.empty()) {
    // Tasks of whole rows, about `target` elements each.
    std::vector<Piece> pieces;
    std::vector<size_t> starts{0};
    for (size_t k = 0; k < rank1.size(); ++k) {
      const int64_t per = std::max<int64_t>(1, target / rank1[k].leaf->cols);
      for (int64_t lo = 0; lo < rows[k]; lo += per) {
        pieces.push_back({k, lo, std::min(rows[k], lo + per)});
        starts.push_back(pieces.size());
      }
    }
    ParallelFor(pool, workers - 1, static_cast<int64_t>(starts.size()) - 1, [&](int64_t task) {
      WithFlushedDenormals([&] {
        for (size_t i = starts[task]; i < starts[task + 1]; ++i) {
          Rank1& state = rank1[pieces[i].leaf];
          const Leaf& leaf = *state.leaf;
          std::vector<uint32_t> cols(leaf.cols, 0);
          kernels.rank1_peaks(leaf, pieces[i].lo, pieces[i].hi, s, flags, state.row_peak.data(),
                              cols.data());
          for (int64_t c = 0; c < leaf.cols; ++c) {
            uint32_t seen = state.col_peak[c].load(std::memory_order_relaxed);
            while (cols[c] > seen &&
                   !state.col_peak[c].compare_exchange_weak(seen, cols[c],
                                                             std::memory_order_relaxed)) {
            }
          }
        }
      });
    });
    for (Rank1& state : rank1) {
      for (size_t r = 0; r < state.row.size(); ++r) {
        state.row[r] = LiveScale(state.row_peak[r]);
        state.inv_row[r] = ReciprocalScale(state.row[r]);
      }
      for (size_t c = 0; c < state.col.size(); ++c) {
        state.col[c] = LiveScale(state.col_peak[c].load());
        state.inv_col[c] = ReciprocalScale(state.col[c]);
      }
    }
  }

  std::vector<Piece> pieces;
  const auto starts = Split(sizes, [&](size_t k) {
    const int64_t unit = SplitUnit(leaves[k]);
    return unit % kAlign == 0 ? unit : std::lcm(unit, kAlign);
  }, target, &pieces);
  ParallelFor(pool, workers - 1, static_cast<int64_t>(starts.size()) - 1, [&](int64_t task) {
    WithFlushedDenormals([&] {
      for (size_t i = starts[task]; i < starts[task + 1]; ++i) {
        kernels.run(leaves[pieces[i].leaf], pieces[i].lo, pieces[i].hi, s, flags);
      }
    });
  });

  // The old scales are decoded: the new ones may overwrite them now.
  for (Rank1& state : rank1) {
    std::copy(state.row.begin(), state.row.end(), static_cast<float*>(state.leaf->nu.out[1]));
    std::copy(state.col.begin(), state.col.end(), static_cast<float*>(state.leaf->nu.out[2]));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace adamx

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamxAdamStep, adamx::StepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<adamx::Scalars>()
                                  .Arg<adamx::Keys>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("flags")
                                  .Attr<ffi::Span<const int64_t>>("leaves")
                                  .Attr<int64_t>("isa"));
