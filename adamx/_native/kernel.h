// The per-element Adam step of abi.h, compiled once per instruction set, and the choice among them.
//
// Shared by the XLA FFI handler (ffi.cc) and the Python module (module.cc); neither XLA nor
// Python appears here.

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

// One leaf's buffers; the outputs may be the inputs (in place), element for element.
struct Leaf {
  const float* p_in;
  const float* g;
  const float* m_in;
  const float* v_in;
  float* p;
  float* m;
  float* v;
};

// Updates elements [lo, hi) of a leaf with the step scalars s.
using StepFn = void (*)(const Leaf& leaf, int64_t lo, int64_t hi, const float* s);

// The instruction-set variants compiled into this library. Every variant runs the same IEEE
// float32 operations in the same order (no FMA contraction, no fast-math), so all give the same
// bits; they differ only in vector width.
int NumIsas();
const char* IsaName(int isa);
bool IsaSupported(int isa);  // whether this CPU (and OS) runs the variant
int BestIsa();               // the widest supported variant, picked once per process

// The step for these flags and decay, compiled for isa (which must be supported).
StepFn PickStep(int isa, int64_t flags, bool decay);

}  // namespace adamx

#endif  // ADAMX_NATIVE_KERNEL_H_
