// The element codes of adamx/_codes.py, and the bits they are made of, for one float32 element:
// bfloat16 rounding (to nearest and stochastic), the random bits of adamx._numerics, the 8- and
// 4-bit codes of quantized moments and their scales.
//
// Operation for operation as the Python: integer arithmetic on float32 bits, comparisons, and
// correctly rounded float32 operations in the same order, so that they give the same bits. All
// of it is inlined into each instruction-set variant's loops (kernel.cc).

#ifndef ADAMX_NATIVE_CODES_H_
#define ADAMX_NATIVE_CODES_H_

#include <cmath>
#include <cstdint>
#include <limits>

// Inlined into the caller, whose instruction-set target it is then compiled for.
#define ADAMX_INLINE inline __attribute__((always_inline))

namespace adamx {
namespace codes {

// ---- float32 bits ------------------------------------------------------------------------------

ADAMX_INLINE constexpr uint32_t BitsOf(float x) { return __builtin_bit_cast(uint32_t, x); }
ADAMX_INLINE constexpr float FloatOf(uint32_t b) { return __builtin_bit_cast(float, b); }

constexpr uint32_t kOne = 0x3F800000u;  // the bits of 1.0f
constexpr uint32_t kAbs = 0x7FFFFFFFu;
constexpr uint32_t kExponent = 0x7F800000u;
constexpr float kNaN = FloatOf(0x7FC00000u);
constexpr float kTiny = std::numeric_limits<float>::min();
constexpr float kF32Max = std::numeric_limits<float>::max();
constexpr float kBf16Max = FloatOf(0x7F7F0000u);
constexpr float kUnit = 1.0f / 65536.0f;  // 16 random bits -> [0, 1)

ADAMX_INLINE bool Finite(float x) { return (BitsOf(x) & kExponent) != kExponent; }

// NaN-propagating minimum (jnp.minimum).
ADAMX_INLINE float Min(float a, float b) { return (a < b || a != a) ? a : b; }

ADAMX_INLINE float FromBf16(uint16_t h) { return FloatOf(uint32_t{h} << 16); }

// Round to nearest even; NaN stays NaN (quiet).
ADAMX_INLINE uint16_t ToBf16(float x) {
  const uint32_t b = BitsOf(x);
  const uint32_t nearest = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((b & kAbs) > kExponent ? (b >> 16) | 0x40u : nearest);
}

// adamx._numerics.stochastic_round to bfloat16: random low bits added, then cut off; to nearest
// where that would give infinity.
ADAMX_INLINE uint16_t StochasticBf16(float x, uint32_t bits) {
  const uint32_t cut = (BitsOf(x) + (bits >> 16)) >> 16;
  return Finite(x) && (cut & 0x7F80u) != 0x7F80u ? static_cast<uint16_t>(cut) : ToBf16(x);
}

// ---- random bits (adamx._numerics.random_bits) -----------------------------------------------

ADAMX_INLINE uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The bits of the element at row-major position `index` (modulo 2**32, as JAX's uint32 iotas).
ADAMX_INLINE uint32_t RandomBits(int64_t index, uint32_t key) {
  return Mix32(static_cast<uint32_t>(index) * 0x9E3779B9u + key);
}

ADAMX_INLINE float Uniform(uint32_t noise) {  // noise < 2**16
  return static_cast<float>(static_cast<int32_t>(noise)) * kUnit;
}

// ---- element codes (adamx/_codes.py) -------------------------------------------------------

template <int kMantissa, int kTop>
struct LogCode {
  static constexpr int kShift = 23 - kMantissa;
  static constexpr int32_t kOffset = static_cast<int32_t>(kOne >> kShift) - kTop;
  static constexpr float kSmallest = FloatOf(kOne - (static_cast<uint32_t>(kTop - 1) << kShift));

  ADAMX_INLINE static int32_t Raw(float mag, uint32_t noise) {
    const int32_t code =
        static_cast<int32_t>((BitsOf(mag) + (noise << (kShift - 16))) >> kShift) - kOffset;
    return code < kTop ? code : kTop;
  }

  // log_encode(signed=True) with noise.
  ADAMX_INLINE static int32_t EncodeSigned(float y, uint32_t noise) {
    const float mag = std::fabs(y);
    const int32_t code = Raw(mag, noise);
    const bool up = kSmallest - mag <= Uniform(noise) * kSmallest;
    const int32_t sized = mag < kSmallest ? static_cast<int32_t>(up) : code;
    return y < 0.0f ? -sized : sized;
  }

  // log_encode(signed=False) with noise; `positive`: the unscaled value is above 0.
  ADAMX_INLINE static int32_t EncodeUnsigned(float y, uint32_t noise, bool positive) {
    const int32_t code = Raw(y, noise);
    return positive ? (code > 1 ? code : 1) : 0;
  }

  ADAMX_INLINE static float Decode(int32_t code) {
    const int32_t size = code < 0 ? -code : code;
    const float mag = size > 0 ? FloatOf(static_cast<uint32_t>(size + kOffset) << kShift) : 0.0f;
    return code < 0 ? -mag : mag;
  }
};

using Signed8 = LogCode<3, 127>;
using Unsigned8 = LogCode<4, 255>;

constexpr float kInv49 = static_cast<float>(1.0 / 49.0);  // np.float32(1 / 49)
constexpr float Square(int k) { return static_cast<float>(k * k) / 49.0f; }

ADAMX_INLINE int32_t SquareEncode(float y, uint32_t noise) {
  const float mag = std::fabs(y);
  int32_t low = 0;  // the lower neighbour's k, found by comparisons (exact)
  for (int k = 1; k <= 6; ++k) low += static_cast<int32_t>(mag >= Square(k));
  const float lo = static_cast<float>(low * low) * kInv49;
  const float hi = static_cast<float>((low + 1) * (low + 1)) * kInv49;
  const int32_t code = low + static_cast<int32_t>(hi - mag <= Uniform(noise) * (hi - lo));
  return y < 0.0f ? -code : code;
}

ADAMX_INLINE float SquareDecode(int32_t code) {
  const int32_t size = code < 0 ? -code : code;
  const float mag = size == 7 ? 1.0f : static_cast<float>(size * size) * kInv49;
  return code < 0 ? -mag : mag;
}

ADAMX_INLINE int32_t LinearEncode(float y, uint32_t noise) {
  const float k = std::floor((y * 16.0f - 1.0f) + Uniform(noise));
  const float clipped = k > 0.0f ? k : 0.0f;  // NaN too: XLA converts NaN to 0
  return static_cast<int32_t>(clipped < 15.0f ? clipped : 15.0f);
}

ADAMX_INLINE float LinearDecode(int32_t code) {
  return (static_cast<float>(code) + 1.0f) * (1.0f / 16.0f);
}

// ---- scales (adamx._codes.live_scale, reciprocal, bfloat16_up) --------------------------------

ADAMX_INLINE float LiveScaleOf(uint32_t peak) {
  const float value = FloatOf(peak);
  const float finite = value >= kTiny ? value : 0.0f;
  return (peak & kExponent) != kExponent ? finite : kNaN;
}

ADAMX_INLINE float ReciprocalOf(float scale) {
  const bool positive = scale > 0.0f;
  const float inverse = 1.0f / (positive ? scale : 1.0f);
  return positive ? (inverse > kTiny ? inverse : kTiny) : 0.0f;
}

ADAMX_INLINE float Bf16Up(float scale) {
  const float up = FloatOf((BitsOf(scale) + 0xFFFFu) & 0xFFFF0000u);
  return scale != scale ? scale : (up < kBf16Max ? up : kBf16Max);
}

// An overflowed square saturates before a second moment is scaled (the formats' encode).
ADAMX_INLINE float Saturated(float v) { return v > kF32Max ? kF32Max : v; }

// The float32 bits of the largest magnitude of x[0, n): NaN above inf above every finite value.
template <bool kSaturate>
ADAMX_INLINE uint32_t PeakBits(const float* __restrict x, int64_t n) {
  uint32_t peak = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = BitsOf(kSaturate ? Saturated(x[i]) : x[i]) & kAbs;
    peak = b > peak ? b : peak;
  }
  return peak;
}

}  // namespace codes
}  // namespace adamx

#endif  // ADAMX_NATIVE_CODES_H_
