// float8 e4m3fn (sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities;
// 0x7F and 0xFF are NaN; largest finite 448), the format of the compressed keys.
#pragma once
#include <array>
#include <cstdint>

namespace flashmem {

// Exact decode of every byte; NaN for 0x7F and 0xFF.
float fp8_e4m3fn_decode(uint8_t byte);

// The 256 decoded values, built once (table lookup for hot loops).
const std::array<float, 256>& fp8_e4m3fn_table();

inline bool fp8_e4m3fn_is_nan(uint8_t byte) { return (byte & 0x7F) == 0x7F; }

// float32 -> e4m3fn, round to nearest even, bit for bit as the reference (PyTorch's cast):
// no saturation. Magnitudes up to 464 (halfway to the next step, ties to even) round to at
// most 448; larger magnitudes, +-inf and NaN all encode as NaN (0x7F with the sign bit).
// We match rather than reject so that keys dumped from the reference re-encode identically;
// mock-cache builders keep their values far inside the range.
uint8_t fp8_e4m3fn_encode(float value);

}  // namespace flashmem
