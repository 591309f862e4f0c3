// The contract between adamx/_native/__init__.py and the adam_step kernel, written down once.
//
// The custom call ADAMX_STEP_TARGET takes, in this order:
//   operand 0:  float32[number of scalars], the step scalars, in the order of ADAMX_STEP_SCALARS;
//   operand 1:  uint32[2 * leaves], leaf k's random-bit keys: its param's at 2k, its moments' at
//               2k + 1 (adamx._numerics.bits_key);
//   then per leaf: its param p, its grad g (p's dtype), its first moment's arrays, its second
//               moment's arrays (ADAMX_MOMENT_FORMATS gives how many, and which), and its Kahan
//               compensation (bfloat16, only where its rounding is kahan);
//   results:    per leaf, the new p, first moment's arrays, second moment's arrays and
//               compensation, in that order (each aliases its operand: the step is in place);
//   attribute flags:  int64, a bitwise OR of the ADAMX_STEP_FLAGS bits;
//   attribute leaves: int64[ADAMX_LEAF_FIELDS count * leaves], each leaf's fields in that order;
//   attribute isa:    int64, the instruction-set variant to run (its position in the compiled
//                     module's ISAS), or -1 for the widest this CPU runs (tests pick one).
//
// Per element, in float32, with g negated first when the flag maximize is set:
//   m, v = the stored moments, decoded (as adamx/_formats.py decodes them)
//   m' = omb1 * g + b1 * m
//   v' = omb2 * (g * g) + b2 * v
//   store m', v' (a quantized moment, and a bfloat16 v', rounds stochastically on 16 random bits
//     of ONE uint32 draw per element, mix32(index * 0x9E3779B9 + moments key): the first moment
//     its low 16 bits, the second its high 16; a bfloat16 m' rounds to nearest; a block's scale
//     comes from the largest of its new values, an Int4Rank1 moment's from the largest of each row
//     and column of the whole leaf). The step goes on with m' and v' unrounded where they are
//     quantized and with a bfloat16 v' unrounded, and with a bfloat16 m' as stored.
//   m_hat = nesterov ? nesterov_m * m' + nesterov_g * g : m' * inv_bc1
//   d = eps_hat ? m_hat * (step_scale / (sqrt(v' + eps_root) + eps))
//               : m_hat / (sqrt(v' * inv_bc2 + eps_root) + eps)
//   d = d + weight_decay * p   (leaves with decay only)
//   u = scale * d
//   float32 p:  p' = p + u
//   bfloat16 p: nearest:    u16 = bf16(u)
//               stochastic: u16 = bf16(sr(p + u, mix32(index * 0x9E3779B9 + param key)) - p)
//               kahan:      e = p + (u + c); u16 = bf16(bf16(e) - p); c' = bf16(e - bf16(p + u16))
//               then p' = bf16(p + u16), as optax.apply_updates adds the update.
// Every operation is one float32 IEEE operation, in this order, with no contraction into FMAs,
// and denormals flushed to zero as XLA:CPU flushes them.
//
// The compiled module exports every list here by name (and ADAMX_ABI_VERSION): Python reads them
// from it, and refuses a module whose version differs from its own (a stale build). Changing an
// entry here changes the ABI: bump ADAMX_ABI_VERSION and adamx/_native/__init__.py's ABI_VERSION.

#ifndef ADAMX_NATIVE_ABI_H_
#define ADAMX_NATIVE_ABI_H_

#define ADAMX_ABI_VERSION 3

#define ADAMX_STEP_TARGET "adamx_adam_step"

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

// X(name): one int64 field of a leaf in the leaves attribute, at its position.
//   param:    ADAMX_PARAM_DTYPES, the dtype of p and g;
//   rounding: ADAMX_ROUNDINGS, how a bfloat16 p is written (nearest for a float32 p);
//   mu, nu:   ADAMX_MOMENT_FORMATS, how each moment is stored;
//   decay:    1 where the leaf gets weight decay, else 0;
//   mu_block, nu_block: elements per block of a block format (adamx._formats.block_length), else 0.
#define ADAMX_LEAF_FIELDS(X) \
  X(param)                   \
  X(rounding)                \
  X(mu)                      \
  X(nu)                      \
  X(decay)                   \
  X(mu_block)                \
  X(nu_block)

// X(name, value): the dtype of a leaf's p and g.
#define ADAMX_PARAM_DTYPES(X) \
  X(float32, 0)               \
  X(bfloat16, 1)

// X(name, value): how a bfloat16 param takes its step.
#define ADAMX_ROUNDINGS(X) \
  X(nearest, 0)            \
  X(stochastic, 1)         \
  X(kahan, 2)

// X(name, value, arrays): how a moment is stored, and its arrays in operand order:
//   float32:     float32, the leaf's shape;
//   bfloat16:    bfloat16, the leaf's shape;
//   int8_blocks: codes int8 (first moment) or uint8 (second), the leaf's shape; absmax
//                float32[blocks] (adamx.Int8Blocks);
//   int4_blocks: codes int8, two per byte along the last axis; absmax bfloat16[blocks]
//                (adamx.Int4Blocks; first moment only);
//   int4_rank1:  codes uint8, two per byte along the last axis (padded to even); row_max
//                float32[rows]; col_max float32[cols] (adamx.Int4Rank1; second moment only).
#define ADAMX_MOMENT_FORMATS(X) \
  X(float32, 0, 1)              \
  X(bfloat16, 1, 1)             \
  X(int8_blocks, 2, 2)          \
  X(int4_blocks, 3, 2)          \
  X(int4_rank1, 4, 3)

#endif  // ADAMX_NATIVE_ABI_H_
