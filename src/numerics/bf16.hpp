// bfloat16 rounding: the query is rounded to bf16 twice in the reference (SPEC 3.4, 3.5).
#pragma once
#include <cstdint>
#include <cstring>

namespace flashmem {

// float32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 with its sign (as PyTorch).
inline uint16_t bf16_bits_from_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7FC0u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// float32 -> nearest bf16 value, kept in a float.
inline float round_to_bf16(float value) {
  uint32_t wide = static_cast<uint32_t>(bf16_bits_from_float(value)) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}

}  // namespace flashmem
