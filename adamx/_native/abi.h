// The contract between adamx/_native/__init__.py and the adam_step kernel, written down once.
//
// The custom call "adamx_adam_step_f32" takes, in this order:
//   operand 0:        float32[kNumScalars], the step scalars, in the order of ADAMX_STEP_SCALARS;
//   operands 1 + 4k:  leaf k's param p, grad g, first moment m, second moment v (float32, one size);
//   results 3k..3k+2: leaf k's new p, m, v (the caller aliases them to the operands: in place);
//   attribute flags:  int64, a bitwise OR of the ADAMX_STEP_FLAGS bits;
//   attribute decay:  int32[number of leaves], nonzero where a leaf gets weight decay.
// Per element, with g negated first when the flag maximize is set:
//   m' = omb1 * g + b1 * m
//   v' = omb2 * (g * g) + b2 * v
//   m_hat = nesterov ? nesterov_m * m' + nesterov_g * g : m' * inv_bc1
//   d = eps_hat ? m_hat * (step_scale / (sqrt(v' + eps_root) + eps))
//               : m_hat / (sqrt(v' * inv_bc2 + eps_root) + eps)
//   d = d + weight_decay * p   (leaves with decay only)
//   p' = p + scale * d
// Every operation is one float32 IEEE operation, in this order, with no contraction into FMAs.
//
// The Python side reads both lists from the compiled module (SCALARS, FLAGS), or from this file
// when the module is not built; tests/test_native.py checks that the two agree and that each
// scalar and flag means what the plain JAX path means. Changing an entry here changes the ABI.

#ifndef ADAMX_NATIVE_ABI_H_
#define ADAMX_NATIVE_ABI_H_

#define ADAMX_STEP_TARGET "adamx_adam_step_f32"

// X(name): one float32 step scalar, at its position in the scalar vector.
#define ADAMX_STEP_SCALARS(X) \
  X(scale)                    \
  X(b1)                       \
  X(omb1)                     \
  X(b2)                       \
  X(omb2)                     \
  X(eps)                      \
  X(eps_root)                 \
  X(weight_decay)             \
  X(inv_bc1)                  \
  X(inv_bc2)                  \
  X(step_scale)               \
  X(nesterov_m)               \
  X(nesterov_g)

// X(name, bit): one option of the update rule, set in the flags attribute as 1 << bit.
#define ADAMX_STEP_FLAGS(X) \
  X(maximize, 0)            \
  X(eps_hat, 1)             \
  X(nesterov, 2)

#endif  // ADAMX_NATIVE_ABI_H_
