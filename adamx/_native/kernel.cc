// The per-element step of abi.h, once per instruction set, chosen at run time (see kernel.h).
//
// The build uses portable flags (no -march=native) and -ffp-contract=off; the wider variants
// come from GCC/Clang target attributes on x86-64 and are picked with __builtin_cpu_supports.
// Other architectures get the one variant their compiler's baseline gives.
//
// A leaf whose p, m and v are all float32 steps in one loop. Any other leaf steps in tiles of
// kTile elements held in small buffers: decode the old moments, compute the new ones, draw the
// random bits, store the moments (a block's scale from its new values first), then the param.
// The element codes are those of codes.h.

#include "kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <utility>
#include <vector>

#include "codes.h"

namespace adamx {
namespace {

#if defined(__clang__)
#define ADAMX_VECTOR_LOOP _Pragma("clang loop vectorize(assume_safety)")
#else
#define ADAMX_VECTOR_LOOP _Pragma("GCC ivdep")
#endif

using namespace codes;  // NOLINT(build/namespaces): the codes are this file's vocabulary

// ---- the step's arithmetic (abi.h) ------------------------------------------------------------

struct Scalars {
  float scale, b1, omb1, b2, omb2, eps, eps_root, wd, inv_bc1, inv_bc2, step_scale, nes_m, nes_g;

  explicit Scalars(const float* s)
      : scale(s[scalar::scale]), b1(s[scalar::b1]), omb1(s[scalar::omb1]), b2(s[scalar::b2]),
        omb2(s[scalar::omb2]), eps(s[scalar::eps]), eps_root(s[scalar::eps_root]),
        wd(s[scalar::weight_decay]), inv_bc1(s[scalar::inv_bc1]), inv_bc2(s[scalar::inv_bc2]),
        step_scale(s[scalar::step_scale]), nes_m(s[scalar::nesterov_m]),
        nes_g(s[scalar::nesterov_g]) {}
};

ADAMX_INLINE float FirstMoment(const Scalars& k, float g, float m) { return k.omb1 * g + k.b1 * m; }
ADAMX_INLINE float SecondMoment(const Scalars& k, float g, float v) {
  return k.omb2 * (g * g) + k.b2 * v;
}

// The update u of abi.h from g and the new moments (p for weight decay).
template <bool kHat, bool kNes, bool kDecay>
ADAMX_INLINE float Update(const Scalars& k, float g, float m, float v, float p) {
  const float m_hat = kNes ? k.nes_m * m + k.nes_g * g : m * k.inv_bc1;
  float d;
  if (kHat) {
    d = m_hat * (k.step_scale / (std::sqrt(v + k.eps_root) + k.eps));
  } else {
    d = m_hat / (std::sqrt(v * k.inv_bc2 + k.eps_root) + k.eps);
  }
  if (kDecay) d = d + k.wd * p;
  return k.scale * d;
}

// A leaf whose p, g, m and v are all float32, in one loop.
template <bool kMax, bool kHat, bool kNes, bool kDecay>
ADAMX_INLINE void Float32Body(const Leaf& l, int64_t lo, int64_t hi, const float* s) {
  const Scalars k(s);
  const float* p_in = static_cast<const float*>(l.p_in);
  const float* g_in = static_cast<const float*>(l.g);
  const float* m_in = static_cast<const float*>(l.mu.in[0]);
  const float* v_in = static_cast<const float*>(l.nu.in[0]);
  float* p_out = static_cast<float*>(l.p_out);
  float* m_out = static_cast<float*>(l.mu.out[0]);
  float* v_out = static_cast<float*>(l.nu.out[0]);
  // Outputs may alias inputs element for element (in place), never across elements.
  ADAMX_VECTOR_LOOP
  for (int64_t i = lo; i < hi; ++i) {
    const float g = kMax ? -g_in[i] : g_in[i];
    const float m = FirstMoment(k, g, m_in[i]);
    const float v = SecondMoment(k, g, v_in[i]);
    const float p = p_in[i];
    m_out[i] = m;
    v_out[i] = v;
    p_out[i] = p + Update<kHat, kNes, kDecay>(k, g, m, v, p);
  }
}

// ---- tiles -------------------------------------------------------------------------------------

constexpr int64_t kTile = 512;  // elements: the buffers below stay in L1

struct alignas(64) Tile {
  float g[kTile];              // the gradient (negated when maximizing)
  float m[kTile];              // the new moments, as the step goes on with them
  float v[kTile];
  uint32_t bits[kTile];        // the moments' random bits
  int8_t codes[kTile + 2];     // 4-bit codes, unpacked
};

// The scales of blocks [first, first + count) of a block-format moment.
struct Blocks {
  int64_t first = 0;
  uint32_t* peak = nullptr;    // the bits of each block's largest new magnitude, max'ed
  float* scale = nullptr;      // its stored scale
  float* inverse = nullptr;    // the reciprocal its values are scaled by
};

// Blocks of a tile: at most kTile of each moment.
struct TileBlocks {
  uint32_t peak[2][kTile];
  float scale[2][kTile];
  float inverse[2][kTile];

  // Moment j's blocks [first, first + count), their peaks zeroed.
  Blocks For(int j, int64_t first, int64_t count) {
    for (int64_t b = 0; b < count; ++b) peak[j][b] = 0;
    return {first, peak[j], scale[j], inverse[j]};
  }
};

// Calls fn(start, end, block) for each block-aligned piece of [a, a + n) (blocks of `block`).
template <typename F>
ADAMX_INLINE void ForBlocks(int64_t a, int64_t n, int64_t block, F&& fn) {
  for (int64_t start = a, end; start < a + n; start = end) {
    const int64_t b = start / block;
    end = std::min((b + 1) * block, a + n);
    fn(start, end, b);
  }
}

// Calls fn(start, end, row, col) for each piece of [a, a + n) within one row of `cols`.
template <typename F>
ADAMX_INLINE void ForRows(int64_t a, int64_t n, int64_t cols, F&& fn) {
  for (int64_t start = a, end; start < a + n; start = end) {
    const int64_t row = start / cols;
    end = std::min((row + 1) * cols, a + n);
    fn(start, end, row, start - row * cols);
  }
}

// 4-bit codes of elements [c0, c1) of a row whose bytes start at `row` (two per byte, element 2j
// in the low nibble); c0 may be odd. Signed codes are two's complement nibbles.
template <bool kSigned>
ADAMX_INLINE void Unpack(const uint8_t* __restrict row, int64_t c0, int64_t c1,
                         int8_t* __restrict codes) {
  auto nibble = [](uint8_t byte, int high) -> int8_t {
    const int value = high ? byte >> 4 : byte & 15;
    return static_cast<int8_t>(kSigned ? (value ^ 8) - 8 : value);
  };
  int64_t c = c0;
  if (c & 1) *codes++ = nibble(row[c++ >> 1], 1);
  const uint8_t* __restrict bytes = row + (c >> 1);
  const int64_t pairs = (c1 - c) >> 1;
  ADAMX_VECTOR_LOOP
  for (int64_t j = 0; j < pairs; ++j) {
    codes[2 * j] = nibble(bytes[j], 0);
    codes[2 * j + 1] = nibble(bytes[j], 1);
  }
  if ((c1 - c) & 1) codes[2 * pairs] = nibble(bytes[pairs], 0);
}

// Writes 4-bit codes of elements [c0, c1) of a row of `cols` (see Unpack). A byte shared with
// elements outside [c0, c1) keeps their nibble, except the padding nibble after an odd row's
// last element, which is 0 as the formats pad.
ADAMX_INLINE void Pack(const int8_t* __restrict codes, int64_t c0, int64_t c1, int64_t cols,
                       uint8_t* __restrict row) {
  int64_t c = c0;
  if (c & 1) {
    uint8_t& byte = row[c >> 1];
    byte = static_cast<uint8_t>((byte & 15) | ((*codes++ & 15) << 4));
    ++c;
  }
  uint8_t* __restrict bytes = row + (c >> 1);
  const int64_t pairs = (c1 - c) >> 1;
  ADAMX_VECTOR_LOOP
  for (int64_t j = 0; j < pairs; ++j) {
    bytes[j] = static_cast<uint8_t>((codes[2 * j] & 15) | ((codes[2 * j + 1] & 15) << 4));
  }
  if ((c1 - c) & 1) {
    uint8_t& byte = bytes[pairs];
    const uint8_t keep = c1 == cols ? 0 : (byte & 0xF0);
    byte = static_cast<uint8_t>(keep | (codes[2 * pairs] & 15));
  }
}

// The bytes of one row of a 4-bit leaf (its last axis, padded to even).
ADAMX_INLINE int64_t PackedCols(int64_t cols) { return (cols + 1) / 2; }

template <bool kBf16>
ADAMX_INLINE float Load(const void* data, int64_t i) {
  if (kBf16) return FromBf16(static_cast<const uint16_t*>(data)[i]);
  return static_cast<const float*>(data)[i];
}

ADAMX_INLINE uint32_t Magnitude(float x) { return BitsOf(x) & kAbs; }

ADAMX_INLINE bool IsBlocks(const Moment& mo) {
  return mo.format == format::int8_blocks || mo.format == format::int4_blocks;
}

ADAMX_INLINE bool IsQuantized(const Moment& mo) { return mo.format >= format::int8_blocks; }

// g of [a, a + n) into t.g, negated when maximizing (a sign flip: exact).
template <bool kBf16>
ADAMX_INLINE void LoadGrad(const Leaf& l, int64_t a, int64_t n, float sign, Tile& t) {
  float* __restrict g = t.g;
  ADAMX_VECTOR_LOOP
  for (int64_t i = 0; i < n; ++i) g[i] = sign * Load<kBf16>(l.g, a + i);
}

// The new first moment of [a, a + n) into t.m, with g into t.g. A float32 or bfloat16 moment is
// stored at once (t.m holds it as stored); a block format's peaks are max'ed into `blocks`.
template <bool kBf16>
ADAMX_INLINE void NewFirst(const Leaf& l, int64_t a, int64_t n, const Scalars& k, float sign,
                           Tile& t, const Blocks& blocks) {
  const Moment& mo = l.mu;
  float* __restrict g = t.g;
  float* __restrict m = t.m;
  switch (mo.format) {
    case format::float32: {
      const float* __restrict in = static_cast<const float*>(mo.in[0]) + a;
      float* __restrict out = static_cast<float*>(mo.out[0]) + a;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < n; ++i) {
        g[i] = sign * Load<kBf16>(l.g, a + i);
        m[i] = FirstMoment(k, g[i], in[i]);
        out[i] = m[i];
      }
      break;
    }
    case format::bfloat16: {
      const uint16_t* __restrict in = static_cast<const uint16_t*>(mo.in[0]) + a;
      uint16_t* __restrict out = static_cast<uint16_t*>(mo.out[0]) + a;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < n; ++i) {
        g[i] = sign * Load<kBf16>(l.g, a + i);
        const uint16_t h = ToBf16(FirstMoment(k, g[i], FromBf16(in[i])));
        out[i] = h;
        m[i] = FromBf16(h);
      }
      break;
    }
    case format::int8_blocks: {
      const float* absmax = static_cast<const float*>(mo.in[1]);
      ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
        const float scale = absmax[b];
        const int8_t* __restrict in = static_cast<const int8_t*>(mo.in[0]) + start;
        float* __restrict gs = g + (start - a);
        float* __restrict ms = m + (start - a);
        uint32_t peak = 0;
        ADAMX_VECTOR_LOOP
        for (int64_t i = 0; i < end - start; ++i) {
          gs[i] = sign * Load<kBf16>(l.g, start + i);
          ms[i] = FirstMoment(k, gs[i], Signed8::Decode(in[i]) * scale);
          peak = std::max(peak, Magnitude(ms[i]));
        }
        uint32_t& slot = blocks.peak[b - blocks.first];
        slot = std::max(slot, peak);
      });
      break;
    }
    case format::int4_blocks: {
      Unpack<true>(static_cast<const uint8_t*>(mo.in[0]), a, a + n, t.codes);
      const uint16_t* absmax = static_cast<const uint16_t*>(mo.in[1]);
      ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
        const float scale = FromBf16(absmax[b]);
        const int8_t* __restrict in = t.codes + (start - a);
        float* __restrict gs = g + (start - a);
        float* __restrict ms = m + (start - a);
        uint32_t peak = 0;
        ADAMX_VECTOR_LOOP
        for (int64_t i = 0; i < end - start; ++i) {
          gs[i] = sign * Load<kBf16>(l.g, start + i);
          ms[i] = FirstMoment(k, gs[i], SquareDecode(in[i]) * scale);
          peak = std::max(peak, Magnitude(ms[i]));
        }
        uint32_t& slot = blocks.peak[b - blocks.first];
        slot = std::max(slot, peak);
      });
      break;
    }
  }
}

// The new second moment of [a, a + n) into t.v from t.g; as NewFirst. An int4_rank1 moment's
// old value is decoded with the leaf's old row and column scales.
ADAMX_INLINE void NewSecond(const Leaf& l, int64_t a, int64_t n, const Scalars& k, Tile& t,
                            const Blocks& blocks) {
  const Moment& mo = l.nu;
  const float* __restrict g = t.g;
  float* __restrict v = t.v;
  switch (mo.format) {
    case format::float32: {
      const float* __restrict in = static_cast<const float*>(mo.in[0]) + a;
      float* __restrict out = static_cast<float*>(mo.out[0]) + a;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < n; ++i) {
        v[i] = SecondMoment(k, g[i], in[i]);
        out[i] = v[i];
      }
      break;
    }
    case format::bfloat16: {
      const uint16_t* __restrict in = static_cast<const uint16_t*>(mo.in[0]) + a;
      uint16_t* __restrict out = static_cast<uint16_t*>(mo.out[0]) + a;
      const uint32_t key = l.key_moments;  // stochastic: to nearest, its decay would stall
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < n; ++i) {  // stored rounded, used unrounded
        v[i] = SecondMoment(k, g[i], FromBf16(in[i]));
        out[i] = StochasticBf16(v[i], RandomBits(a + i, key));
      }
      break;
    }
    case format::int8_blocks: {
      const float* absmax = static_cast<const float*>(mo.in[1]);
      ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
        const float scale = absmax[b];
        const uint8_t* __restrict in = static_cast<const uint8_t*>(mo.in[0]) + start;
        const float* __restrict gs = g + (start - a);
        float* __restrict vs = v + (start - a);
        uint32_t peak = 0;
        ADAMX_VECTOR_LOOP
        for (int64_t i = 0; i < end - start; ++i) {
          vs[i] = SecondMoment(k, gs[i], Unsigned8::Decode(in[i]) * scale);
          peak = std::max(peak, Magnitude(Saturated(vs[i])));
        }
        uint32_t& slot = blocks.peak[b - blocks.first];
        slot = std::max(slot, peak);
      });
      break;
    }
    case format::int4_rank1: {
      const uint8_t* in = static_cast<const uint8_t*>(mo.in[0]);
      ForRows(a, n, l.cols, [&](int64_t start, int64_t end, int64_t row, int64_t c0) {
        int8_t* __restrict codes = t.codes;
        Unpack<false>(in + row * PackedCols(l.cols), c0, c0 + (end - start), codes);
        const float row_scale = l.old_row[row];
        const float* __restrict col_scale = l.old_col + c0;
        const float* __restrict gs = g + (start - a);
        float* __restrict vs = v + (start - a);
        ADAMX_VECTOR_LOOP
        for (int64_t i = 0; i < end - start; ++i) {
          vs[i] = SecondMoment(k, gs[i], LinearDecode(codes[i]) * Min(row_scale, col_scale[i]));
        }
      });
      break;
    }
  }
}

// The stored scales and reciprocals of blocks [first, first + count) from their peaks.
ADAMX_INLINE void Scale(const Moment& mo, const Blocks& blocks, int64_t count) {
  for (int64_t b = 0; b < count; ++b) {
    const float live = LiveScaleOf(blocks.peak[b]);
    blocks.scale[b] = mo.format == format::int4_blocks ? Bf16Up(live) : live;
    blocks.inverse[b] = ReciprocalOf(blocks.scale[b]);
  }
}

// Writes the stored scales of blocks [first, first + count) of a block-format moment.
ADAMX_INLINE void WriteScales(const Moment& mo, const Blocks& blocks, int64_t count) {
  if (mo.format == format::int8_blocks) {
    float* out = static_cast<float*>(mo.out[1]) + blocks.first;
    for (int64_t b = 0; b < count; ++b) out[b] = blocks.scale[b];
  } else {
    uint16_t* out = static_cast<uint16_t*>(mo.out[1]) + blocks.first;
    for (int64_t b = 0; b < count; ++b) {
      out[b] = static_cast<uint16_t>(BitsOf(blocks.scale[b]) >> 16);  // exact: rounded up
    }
  }
}

// Stores a quantized first moment of [a, a + n) from t.m, drawing the tile's random bits into
// t.bits (the second moment uses their high half).
ADAMX_INLINE void StoreFirst(const Leaf& l, int64_t a, int64_t n, Tile& t, const Blocks& blocks) {
  const Moment& mo = l.mu;
  const uint32_t key = l.key_moments;
  const float* __restrict m = t.m;
  uint32_t* __restrict bits = t.bits;
  if (mo.format == format::int8_blocks) {
    ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
      const float inverse = blocks.inverse[b - blocks.first];
      const float* __restrict y = m + (start - a);
      uint32_t* __restrict r = bits + (start - a);
      int8_t* __restrict out = static_cast<int8_t*>(mo.out[0]) + start;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < end - start; ++i) {
        r[i] = RandomBits(start + i, key);
        out[i] = static_cast<int8_t>(Signed8::EncodeSigned(y[i] * inverse, r[i] & 0xFFFFu));
      }
    });
  } else {
    ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
      const float inverse = blocks.inverse[b - blocks.first];
      const float* __restrict y = m + (start - a);
      uint32_t* __restrict r = bits + (start - a);
      int8_t* __restrict codes = t.codes + (start - a);
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < end - start; ++i) {
        r[i] = RandomBits(start + i, key);
        codes[i] = static_cast<int8_t>(SquareEncode(y[i] * inverse, r[i] & 0xFFFFu));
      }
    });
    Pack(t.codes, a, a + n, l.size, static_cast<uint8_t*>(mo.out[0]));
  }
}

// Stores a quantized second moment of [a, a + n) from t.v, with the bits in t.bits where kDrawn
// (else it draws them).
template <bool kDrawn>
ADAMX_INLINE void StoreSecond(const Leaf& l, int64_t a, int64_t n, Tile& t, const Blocks& blocks) {
  const Moment& mo = l.nu;
  const uint32_t key = l.key_moments;
  const float* __restrict v = t.v;
  const uint32_t* __restrict bits = t.bits;
  if (mo.format == format::int8_blocks) {
    ForBlocks(a, n, mo.block, [&](int64_t start, int64_t end, int64_t b) {
      const float inverse = blocks.inverse[b - blocks.first];
      const float* __restrict y = v + (start - a);
      const uint32_t* __restrict r = bits + (start - a);
      uint8_t* __restrict out = static_cast<uint8_t*>(mo.out[0]) + start;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < end - start; ++i) {
        const uint32_t noise = (kDrawn ? r[i] : RandomBits(start + i, key)) >> 16;
        const float value = Saturated(y[i]);
        out[i] = static_cast<uint8_t>(
            Unsigned8::EncodeUnsigned(value * inverse, noise, value > 0.0f));
      }
    });
  } else {
    uint8_t* out = static_cast<uint8_t*>(mo.out[0]);
    ForRows(a, n, l.cols, [&](int64_t start, int64_t end, int64_t row, int64_t c0) {
      // Reciprocals are never NaN: std::max is jnp.maximum here.
      const float row_inverse = l.inv_row[row];
      const float* __restrict col_inverse = l.inv_col + c0;
      const float* __restrict y = v + (start - a);
      const uint32_t* __restrict r = bits + (start - a);
      int8_t* __restrict codes = t.codes;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < end - start; ++i) {
        const uint32_t noise = (kDrawn ? r[i] : RandomBits(start + i, key)) >> 16;
        codes[i] = static_cast<int8_t>(
            LinearEncode(Saturated(y[i]) * std::max(row_inverse, col_inverse[i]), noise));
      }
      Pack(codes, c0, c0 + (end - start), l.cols, out + row * PackedCols(l.cols));
    });
  }
}

// The param kinds of the final loop: its dtype and, for bfloat16, its rounding.
enum ParamKind : int { kFloat32, kNearest, kStochastic, kKahan, kNumParamKinds };

ADAMX_INLINE int ParamKindOf(const Leaf& l) {
  if (l.param == param::float32) return kFloat32;
  return l.rounding == rounding::kahan ? kKahan
         : l.rounding == rounding::stochastic ? kStochastic : kNearest;
}

// The update and the new param of elements [a, a + n), from the tile's g and new moments.
template <bool kHat, bool kNes, bool kDecay, int kKind>
ADAMX_INLINE void FinishBody(const Leaf& l, int64_t a, int64_t n, const float* s, const Tile& t) {
  const Scalars k(s);
  const float* __restrict g = t.g;
  const float* __restrict m = t.m;
  const float* __restrict v = t.v;
  if (kKind == kFloat32) {
    const float* __restrict p_in = static_cast<const float*>(l.p_in) + a;
    float* __restrict p_out = static_cast<float*>(l.p_out) + a;
    ADAMX_VECTOR_LOOP
    for (int64_t i = 0; i < n; ++i) {
      const float p = p_in[i];
      p_out[i] = p + Update<kHat, kNes, kDecay>(k, g[i], m[i], v[i], p);
    }
    return;
  }
  const uint16_t* __restrict p_in = static_cast<const uint16_t*>(l.p_in) + a;
  uint16_t* __restrict p_out = static_cast<uint16_t*>(l.p_out) + a;
  const uint16_t* __restrict c_in = l.c_in + (kKind == kKahan ? a : 0);
  uint16_t* __restrict c_out = l.c_out + (kKind == kKahan ? a : 0);
  const uint32_t key = l.key_param;
  ADAMX_VECTOR_LOOP
  for (int64_t i = 0; i < n; ++i) {
    const float p = FromBf16(p_in[i]);
    const float u = Update<kHat, kNes, kDecay>(k, g[i], m[i], v[i], p);
    float exact = 0.0f;  // Kahan's: the param's value with its compensation
    uint16_t step;       // the update in bfloat16, which optax.apply_updates adds to p
    if (kKind == kNearest) {
      step = ToBf16(u);
    } else if (kKind == kStochastic) {
      step = ToBf16(FromBf16(StochasticBf16(p + u, RandomBits(a + i, key))) - p);
    } else {
      exact = p + (u + FromBf16(c_in[i]));
      step = ToBf16(FromBf16(ToBf16(exact)) - p);
    }
    const uint16_t landed = ToBf16(p + FromBf16(step));
    if (kKind == kKahan) c_out[i] = ToBf16(exact - FromBf16(landed));
    p_out[i] = landed;
  }
}

using FinishFn = void (*)(const Leaf&, int64_t, int64_t, const float*, const Tile&);
using Float32Fn = void (*)(const Leaf&, int64_t, int64_t, const float*);

// A key of the flag-dependent loops: (eps_hat, nesterov, decay) bits, then the param kind.
constexpr int kFinishKeys = 8 * kNumParamKinds;

ADAMX_INLINE int FlagBits(int64_t flags, bool decay) {
  return ((flags & flag::eps_hat) ? 4 : 0) | ((flags & flag::nesterov) ? 2 : 0) | (decay ? 1 : 0);
}

// The new moments of [a, a + n): those whose flag is set (g always), peaks max'ed into blocks.
ADAMX_INLINE void NewMoments(const Leaf& l, int64_t a, int64_t n, const Scalars& k, float sign,
                             Tile& t, bool first, bool second, const Blocks& mu,
                             const Blocks& nu) {
  const bool bf16 = l.param == param::bfloat16;
  if (first) {
    if (bf16) {
      NewFirst<true>(l, a, n, k, sign, t, mu);
    } else {
      NewFirst<false>(l, a, n, k, sign, t, mu);
    }
  } else if (bf16) {
    LoadGrad<true>(l, a, n, sign, t);
  } else {
    LoadGrad<false>(l, a, n, sign, t);
  }
  if (second) NewSecond(l, a, n, k, t, nu);
}

// Stores the quantized moments of [a, a + n) (NewMoments stored the others).
ADAMX_INLINE void StoreQuantized(const Leaf& l, int64_t a, int64_t n, Tile& t, const Blocks& mu,
                                 const Blocks& nu) {
  if (IsQuantized(l.mu)) StoreFirst(l, a, n, t, mu);
  if (IsQuantized(l.nu)) {
    if (IsQuantized(l.mu)) {
      StoreSecond<true>(l, a, n, t, nu);
    } else {
      StoreSecond<false>(l, a, n, t, nu);
    }
  }
}

// The tiled step of elements [lo, hi) of a leaf with the variant's Finish table.
template <typename V>
ADAMX_INLINE void TiledBody(const Leaf& l, int64_t lo, int64_t hi, const float* s, int64_t flags) {
  Tile t;
  TileBlocks tile_blocks;
  const Scalars k(s);
  const float sign = (flags & flag::maximize) ? -1.0f : 1.0f;
  const FinishFn finish = V::kFinish[FlagBits(flags, l.decay) * kNumParamKinds + ParamKindOf(l)];
  const bool blocks_mu = IsBlocks(l.mu), blocks_nu = IsBlocks(l.nu);
  const int64_t big = std::max(blocks_mu ? l.mu.block : 0, blocks_nu ? l.nu.block : 0);
  if (big <= kTile) {
    // Each tile holds whole blocks: its new values give their scales at once.
    for (int64_t a = lo; a < hi; a += kTile) {
      const int64_t n = std::min(kTile, hi - a);
      const int64_t count_mu = blocks_mu ? (n + l.mu.block - 1) / l.mu.block : 0;
      const int64_t count_nu = blocks_nu ? (n + l.nu.block - 1) / l.nu.block : 0;
      const Blocks mu = tile_blocks.For(0, blocks_mu ? a / l.mu.block : 0, count_mu);
      const Blocks nu = tile_blocks.For(1, blocks_nu ? a / l.nu.block : 0, count_nu);
      NewMoments(l, a, n, k, sign, t, true, true, mu, nu);
      Scale(l.mu, mu, count_mu);
      Scale(l.nu, nu, count_nu);
      StoreQuantized(l, a, n, t, mu, nu);
      if (blocks_mu) WriteScales(l.mu, mu, count_mu);
      if (blocks_nu) WriteScales(l.nu, nu, count_nu);
      finish(l, a, n, s, t);
    }
    return;
  }
  // Blocks longer than a tile: a first pass over each group of `big` elements finds its blocks'
  // peaks, the second recomputes the new values and stores them.
  for (int64_t group = lo; group < hi; group += big) {
    const int64_t end = std::min(group + big, hi);
    const int64_t count_mu = blocks_mu ? (end - group + l.mu.block - 1) / l.mu.block : 0;
    const int64_t count_nu = blocks_nu ? (end - group + l.nu.block - 1) / l.nu.block : 0;
    // The blocks' peaks, and scratch for the second pass's (which are the same).
    std::vector<uint32_t> peaks(2 * (count_mu + count_nu), 0);
    std::vector<float> scales(2 * (count_mu + count_nu));
    const Blocks mu{blocks_mu ? group / l.mu.block : 0, peaks.data(), scales.data(),
                    scales.data() + count_mu};
    const Blocks nu{blocks_nu ? group / l.nu.block : 0, peaks.data() + count_mu,
                    scales.data() + 2 * count_mu, scales.data() + 2 * count_mu + count_nu};
    for (int64_t a = group; a < end; a += kTile) {
      const int64_t n = std::min(kTile, end - a);
      NewMoments(l, a, n, k, sign, t, blocks_mu, blocks_nu, mu, nu);
    }
    Scale(l.mu, mu, count_mu);
    Scale(l.nu, nu, count_nu);
    const Blocks scratch_mu{mu.first, mu.peak + count_mu + count_nu, mu.scale, mu.inverse};
    const Blocks scratch_nu{nu.first, nu.peak + count_mu + count_nu, nu.scale, nu.inverse};
    for (int64_t a = group; a < end; a += kTile) {
      const int64_t n = std::min(kTile, end - a);
      NewMoments(l, a, n, k, sign, t, true, true, scratch_mu, scratch_nu);
      StoreQuantized(l, a, n, t, mu, nu);
      finish(l, a, n, s, t);
    }
    if (blocks_mu) WriteScales(l.mu, mu, count_mu);
    if (blocks_nu) WriteScales(l.nu, nu, count_nu);
  }
}

// The new second moment's peaks of rows [row_lo, row_hi) of an int4_rank1 leaf.
ADAMX_INLINE void Rank1PeaksBody(const Leaf& l, int64_t row_lo, int64_t row_hi, const float* s,
                                 int64_t flags, uint32_t* row_peak, uint32_t* col_peak) {
  Tile t;
  const Scalars k(s);
  const float sign = (flags & flag::maximize) ? -1.0f : 1.0f;
  for (int64_t row = row_lo; row < row_hi; ++row) {
    uint32_t peak = 0;
    for (int64_t c = 0; c < l.cols; c += kTile) {
      const int64_t n = std::min(kTile, l.cols - c);
      const int64_t a = row * l.cols + c;
      if (l.param == param::bfloat16) {
        LoadGrad<true>(l, a, n, sign, t);
      } else {
        LoadGrad<false>(l, a, n, sign, t);
      }
      NewSecond(l, a, n, k, t, Blocks{});
      const float* __restrict v = t.v;
      uint32_t* __restrict cols = col_peak + c;
      ADAMX_VECTOR_LOOP
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t b = Magnitude(Saturated(v[i]));
        cols[i] = std::max(cols[i], b);
        peak = std::max(peak, b);
      }
    }
    row_peak[row] = peak;
  }
}

// The step of elements [lo, hi) of a leaf with the variant V's tables.
template <typename V>
ADAMX_INLINE void RunBody(const Leaf& l, int64_t lo, int64_t hi, const float* s, int64_t flags) {
  if (l.param == param::float32 && l.mu.format == format::float32 &&
      l.nu.format == format::float32) {
    const int key = ((flags & flag::maximize) ? 8 : 0) | FlagBits(flags, l.decay);
    V::kFloat32[key](l, lo, hi, s);
    return;
  }
  TiledBody<V>(l, lo, hi, s, flags);
}

// ---- the instruction-set variants -------------------------------------------------------------

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

// The members of one variant, each compiled with the variant's target attribute (the bodies
// above are always inlined into them).
#define ADAMX_VARIANT_MEMBERS(TARGET)                                                            \
  template <int kKey>                                                                            \
  TARGET static void Float32(const Leaf& l, int64_t lo, int64_t hi, const float* s) {            \
    Float32Body<(kKey & 8) != 0, (kKey & 4) != 0, (kKey & 2) != 0, (kKey & 1) != 0>(l, lo, hi, s); \
  }                                                                                              \
  template <int kKey>                                                                            \
  TARGET static void Finish(const Leaf& l, int64_t a, int64_t n, const float* s, const Tile& t) { \
    constexpr int kBits = kKey / kNumParamKinds;                                                 \
    FinishBody<(kBits & 4) != 0, (kBits & 2) != 0, (kBits & 1) != 0, kKey % kNumParamKinds>(      \
        l, a, n, s, t);                                                                          \
  }                                                                                              \
  TARGET static void Run(const Leaf& l, int64_t lo, int64_t hi, const float* s, int64_t flags) { \
    RunBody<Variant>(l, lo, hi, s, flags);                                                       \
  }                                                                                              \
  TARGET static void Rank1Peaks(const Leaf& l, int64_t row_lo, int64_t row_hi, const float* s,   \
                                int64_t flags, uint32_t* row_peak, uint32_t* col_peak) {         \
    Rank1PeaksBody(l, row_lo, row_hi, s, flags, row_peak, col_peak);                             \
  }                                                                                              \
  static const std::array<Float32Fn, 16> kFloat32;                                               \
  static const std::array<FinishFn, kFinishKeys> kFinish;

#define ADAMX_NO_TARGET

template <>
struct Variant<kBaseline> {
  static constexpr const char* kName = "baseline";
  ADAMX_VARIANT_MEMBERS(ADAMX_NO_TARGET)
};

#if defined(__x86_64__)
#if defined(__clang__)
#define ADAMX_AVX2 __attribute__((target("avx2")))
#define ADAMX_AVX512 __attribute__((target("avx512f,avx512bw"), min_vector_width(512)))
#else
#define ADAMX_AVX2 __attribute__((target("avx2")))
#define ADAMX_AVX512 __attribute__((target("avx512f,avx512bw,prefer-vector-width=512")))
#endif

template <>
struct Variant<kAvx2> {
  static constexpr const char* kName = "avx2";
  ADAMX_VARIANT_MEMBERS(ADAMX_AVX2)
};

template <>
struct Variant<kAvx512> {
  static constexpr const char* kName = "avx512";
  ADAMX_VARIANT_MEMBERS(ADAMX_AVX512)
};
#endif  // __x86_64__

template <typename V, int... kKeys>
constexpr std::array<Float32Fn, sizeof...(kKeys)> Float32Table(
    std::integer_sequence<int, kKeys...>) {
  return {&V::template Float32<kKeys>...};
}

template <typename V, int... kKeys>
constexpr std::array<FinishFn, sizeof...(kKeys)> FinishTable(std::integer_sequence<int, kKeys...>) {
  return {&V::template Finish<kKeys>...};
}

#define ADAMX_VARIANT_TABLES(ISA)                                                           \
  const std::array<Float32Fn, 16> Variant<ISA>::kFloat32 =                                  \
      Float32Table<Variant<ISA>>(std::make_integer_sequence<int, 16>());                    \
  const std::array<FinishFn, kFinishKeys> Variant<ISA>::kFinish =                           \
      FinishTable<Variant<ISA>>(std::make_integer_sequence<int, kFinishKeys>());

ADAMX_VARIANT_TABLES(kBaseline)
#if defined(__x86_64__)
ADAMX_VARIANT_TABLES(kAvx2)
ADAMX_VARIANT_TABLES(kAvx512)
#endif

template <size_t... kIsas>
std::array<Kernels, kNumIsas> MakeKernels(std::index_sequence<kIsas...>) {
  return {Kernels{&Variant<kIsas>::Run, &Variant<kIsas>::Rank1Peaks}...};
}

const std::array<Kernels, kNumIsas> kKernels = MakeKernels(std::make_index_sequence<kNumIsas>());

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
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    default:
      break;
  }
#endif
  return isa == kBaseline;
}

}  // namespace

int64_t SplitUnit(const Leaf& leaf) {
  int64_t unit = 1;
  for (const Moment* mo : {&leaf.mu, &leaf.nu}) {
    if (IsBlocks(*mo)) unit = std::lcm(unit, mo->block);
    if (mo->format == format::int4_blocks || mo->format == format::int4_rank1) {
      unit = std::lcm(unit, int64_t{2});  // whole bytes
    }
  }
  if (HasRank1(leaf) && leaf.cols % 2) unit = std::lcm(unit, leaf.cols);  // rows own their bytes
  return unit;
}

float LiveScale(uint32_t peak) { return LiveScaleOf(peak); }

float ReciprocalScale(float scale) { return ReciprocalOf(scale); }

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

const Kernels& KernelsFor(int isa) { return kKernels[isa]; }

}  // namespace adamx
