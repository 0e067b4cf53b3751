#include "src/retriever/compressed_keys.hpp"

#include <cmath>
#include <cstring>

#include "src/common/error.hpp"
#include "src/common/parallel.hpp"
#include "src/numerics/fp8.hpp"
#include "src/retriever/synthetic.hpp"

namespace flashmem {

float CompressedKeysView::scale(int64_t b, int64_t n) const {
  float s;
  std::memcpy(&s, chunk(b, n) + kKeyDim, 4);
  return s;
}

namespace {
// Uniform in (0, 1) from a counter, 53 random bits.
double unit(uint64_t seed, uint64_t counter) {
  return (static_cast<double>(splitmix64(seed * 0x2545F4914F6CDD1Dull + counter) >> 11) + 0.5) * 0x1.0p-53;
}
}  // namespace

std::vector<uint8_t> mock_compressed_keys(int64_t batch, int64_t chunks, uint64_t seed) {
  std::vector<uint8_t> out(static_cast<size_t>(batch * chunks) * kChunkBytes);
  parallel_for(batch * chunks, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      uint8_t* chunk = out.data() + c * kChunkBytes;
      const uint64_t base = static_cast<uint64_t>(c) * (kKeyDim + 1);
      for (int d = 0; d < kKeyDim; d += 2) {  // Box-Muller: two normals per pair of uniforms
        const double r = std::sqrt(-2.0 * std::log(unit(seed, base + d))), t = 2.0 * M_PI * unit(seed, base + d + 1);
        chunk[d] = fp8_e4m3fn_encode(static_cast<float>(r * std::cos(t)) * 0.5f);
        chunk[d + 1] = fp8_e4m3fn_encode(static_cast<float>(r * std::sin(t)) * 0.5f);
      }
      const float scale = static_cast<float>(0.05 + 0.15 * unit(seed, base + kKeyDim));
      std::memcpy(chunk + kKeyDim, &scale, 4);
    }
  });
  return out;
}

std::vector<uint8_t> encode_compressed_keys(std::span<const float> keys, std::span<const float> scales) {
  const size_t rows = scales.size();
  if (keys.size() != rows * kKeyDim) fail("encode_compressed_keys: keys must be [rows, 128] for ", rows, " scales");
  std::vector<uint8_t> out(rows * kChunkBytes);
  for (size_t r = 0; r < rows; ++r) {
    if (!(std::isfinite(scales[r]) && scales[r] > 0)) fail("encode_compressed_keys: scale of row ", r, " must be finite and > 0");
    uint8_t* chunk = out.data() + r * kChunkBytes;
    for (int d = 0; d < kKeyDim; ++d) chunk[d] = fp8_e4m3fn_encode(keys[r * kKeyDim + d] / scales[r]);
    std::memcpy(chunk + kKeyDim, &scales[r], 4);
  }
  return out;
}

void dequantize_chunk(const uint8_t* chunk, float* out) {
  const auto& table = fp8_e4m3fn_table();
  float scale;
  std::memcpy(&scale, chunk + kKeyDim, 4);
  for (int d = 0; d < kKeyDim; ++d) out[d] = table[chunk[d]] * scale;
}

void validate_chunk(const uint8_t* chunk, int64_t b, int64_t n, const char* what) {
  float scale;
  std::memcpy(&scale, chunk + kKeyDim, 4);
  if (!std::isfinite(scale))
    fail(what, ": scale of batch row ", b, " chunk ", n, " is ", scale, ", expected a finite float32");
  for (int d = 0; d < kKeyDim; ++d)
    if (fp8_e4m3fn_is_nan(chunk[d]))
      fail(what, ": batch row ", b, " chunk ", n, " value ", d, " is an fp8 NaN byte (0x", std::hex,
           static_cast<int>(chunk[d]), std::dec, "), expected a finite e4m3fn value");
}

void validate_compressed_keys(const CompressedKeysView& keys, const char* what) {
  for (int64_t b = 0; b < keys.batch; ++b)
    for (int64_t n = 0; n < keys.chunks; ++n) validate_chunk(keys.chunk(b, n), b, n, what);
}

}  // namespace flashmem
