// The per-element step of abi.h over one leaf, compiled once per instruction set, and the choice
// among them.
//
// Shared by the XLA FFI handler (ffi.cc) and the Python module (module.cc); neither XLA nor
// Python appears here. The handler checks the operands against the ABI and fills in a Leaf per
// leaf; everything here trusts it.

#ifndef ADAMX_NATIVE_KERNEL_H_
#define ADAMX_NATIVE_KERNEL_H_

#include <cstdint>

#include "abi.h"

namespace adamx {

// Positions in the step-scalar vector, generated from abi.h: s[scalar::b1] is b1.
namespace scalar {
enum Index : int {
#define ADAMX_SCALAR_INDEX(name) name,
  ADAMX_STEP_SCALARS(ADAMX_SCALAR_INDEX)
#undef ADAMX_SCALAR_INDEX
  kCount
};
}  // namespace scalar

// Bits of the flags attribute, generated from abi.h.
namespace flag {
enum Bit : int64_t {
#define ADAMX_FLAG_BIT(name, bit) name = int64_t{1} << (bit),
  ADAMX_STEP_FLAGS(ADAMX_FLAG_BIT)
#undef ADAMX_FLAG_BIT
};
#define ADAMX_FLAG_OR(name, bit) | name
constexpr int64_t kAll = 0 ADAMX_STEP_FLAGS(ADAMX_FLAG_OR);
#undef ADAMX_FLAG_OR
}  // namespace flag

// Positions of a leaf's fields in the leaves attribute.
namespace field {
enum Index : int {
#define ADAMX_FIELD_INDEX(name) name,
  ADAMX_LEAF_FIELDS(ADAMX_FIELD_INDEX)
#undef ADAMX_FIELD_INDEX
  kCount
};
}  // namespace field

#define ADAMX_ENUM_VALUE(name, value, ...) name = value,
namespace param {
enum Dtype : int { ADAMX_PARAM_DTYPES(ADAMX_ENUM_VALUE) };
}
namespace rounding {
enum Mode : int { ADAMX_ROUNDINGS(ADAMX_ENUM_VALUE) };
}
namespace format {
enum Format : int { ADAMX_MOMENT_FORMATS(ADAMX_ENUM_VALUE) };
}
#undef ADAMX_ENUM_VALUE

// How a leaf's moment is stored, and where.
struct Moment {
  int format = format::float32;
  int64_t block = 0;         // elements per block (int8_blocks, int4_blocks)
  const void* in[3] = {};    // its arrays in operand order (abi.h)
  void* out[3] = {};         // the new ones: the same memory as `in` when the step is in place
};

// One leaf of a step. Outputs may be their inputs (in place), element for element.
struct Leaf {
  int param = param::float32;
  int rounding = rounding::nearest;
  bool decay = false;
  int64_t size = 0;
  int64_t cols = 1;          // the last dimension (1 for a 0-d leaf): rows and columns of int4
  const void* p_in = nullptr;
  const void* g = nullptr;
  void* p_out = nullptr;
  const uint16_t* c_in = nullptr;  // Kahan's compensation (bfloat16)
  uint16_t* c_out = nullptr;
  Moment mu, nu;
  uint32_t key_param = 0, key_moments = 0;
  // An int4_rank1 second moment's old scales (copies: the new ones overwrite the operands), and
  // the reciprocals of its new ones (ReciprocalScale), each per row and per column.
  const float* old_row = nullptr;
  const float* old_col = nullptr;
  const float* inv_row = nullptr;
  const float* inv_col = nullptr;
};

// Whether a leaf has an int4_rank1 second moment, whose scales need a pass over the whole leaf
// (Rank1Peaks) before any element is stored.
inline bool HasRank1(const Leaf& leaf) { return leaf.nu.format == format::int4_rank1; }

// The elements of a leaf may be split between threads at multiples of this (whole blocks, whole
// bytes of 4-bit codes, whole rows where an odd row's codes are padded).
int64_t SplitUnit(const Leaf& leaf);

// The stored scale of an int4_rank1 row or column whose new values' largest magnitude has the
// float32 bits `peak` (adamx._codes.live_scale), and the reciprocal that scales its values.
float LiveScale(uint32_t peak);
float ReciprocalScale(float scale);

// One instruction-set variant of the step.
struct Kernels {
  // Steps elements [lo, hi) of a leaf; lo and hi are multiples of SplitUnit (or hi its size).
  void (*run)(const Leaf& leaf, int64_t lo, int64_t hi, const float* s, int64_t flags);
  // For an int4_rank1 second moment: the new v of rows [row_lo, row_hi), its largest magnitude
  // per row into row_peak[row] and per column max'ed into col_peak[col] (float32 bits).
  void (*rank1_peaks)(const Leaf& leaf, int64_t row_lo, int64_t row_hi, const float* s,
                      int64_t flags, uint32_t* row_peak, uint32_t* col_peak);
};

// The instruction-set variants compiled into this library. Every variant runs the same IEEE
// float32 operations in the same order (no FMA contraction, no fast-math), so all give the same
// bits; they differ only in vector width.
int NumIsas();
const char* IsaName(int isa);
bool IsaSupported(int isa);  // whether this CPU (and OS) runs the variant
int BestIsa();               // the widest supported variant, picked once per process
const Kernels& KernelsFor(int isa);  // isa must be supported

// Runs fn with denormals flushed to zero (inputs and results), as XLA:CPU computes, and restores
// the thread's floating-point state after.
template <typename F>
void WithFlushedDenormals(F&& fn);

}  // namespace adamx

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
template <typename F>
void adamx::WithFlushedDenormals(F&& fn) {
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
  fn();
  _mm_setcsr(csr);
}
#elif defined(__aarch64__)
template <typename F>
void adamx::WithFlushedDenormals(F&& fn) {
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr | (uint64_t{1} << 24)));  // FZ
  fn();
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
#else
template <typename F>
void adamx::WithFlushedDenormals(F&& fn) {
  fn();
}
#endif

#endif  // ADAMX_NATIVE_KERNEL_H_
