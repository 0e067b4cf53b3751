#include "src/numerics/fp8.hpp"

#include <cmath>
#include <cstring>
#include <limits>

namespace flashmem {

float fp8_e4m3fn_decode(uint8_t byte) {
  const float sign = (byte & 0x80) ? -1.0f : 1.0f;
  const int exponent = (byte >> 3) & 0xF, mantissa = byte & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa) / 8.0f, -6);
  return sign * std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
}

const std::array<float, 256>& fp8_e4m3fn_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3fn_decode(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

uint8_t fp8_e4m3fn_encode(float value) {
  // Bit manipulation as in c10's fp8e4m3fn_from_fp32_value.
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t sign = bits & 0x80000000u;
  uint32_t magnitude = bits ^ sign;
  constexpr uint32_t kFirstOverflow = 1087u << 20;  // 480.0f: from here the rounding below would carry into the NaN code anyway
  constexpr uint32_t kSmallestNormal = 121u << 23;  // 2^-6
  constexpr uint32_t kDenormMagic = 141u << 23;     // 2^14: aligns subnormal mantissas for rounding
  uint8_t result;
  if (magnitude >= kFirstOverflow) {
    result = 0x7F;
  } else if (magnitude < kSmallestNormal) {
    float f, magic;
    std::memcpy(&f, &magnitude, 4);
    std::memcpy(&magic, &kDenormMagic, 4);
    f += magic;  // the FPU's round-to-nearest-even does the subnormal rounding
    uint32_t rounded;
    std::memcpy(&rounded, &f, 4);
    result = static_cast<uint8_t>(rounded - kDenormMagic);
  } else {
    const uint32_t odd = (magnitude >> 20) & 1;
    magnitude += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFF + odd;
    result = static_cast<uint8_t>(magnitude >> 20);
  }
  return static_cast<uint8_t>(result | (sign >> 24));
}

}  // namespace flashmem
