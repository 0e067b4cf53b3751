// Compressed keys: one chunk = 128 fp8 e4m3fn bytes + a little-endian float32 scale (SPEC 1),
// batched [B, N, 132].
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace flashmem {

constexpr int kChunkBytes = 132;
constexpr int kKeyDim = 128;

struct CompressedKeysView {
  const uint8_t* data = nullptr;  // [batch, chunks, 132]
  int64_t batch = 0, chunks = 0;

  const uint8_t* chunk(int64_t b, int64_t n) const { return data + (b * chunks + n) * kChunkBytes; }
  float scale(int64_t b, int64_t n) const;
};

// Mock keys as the reference demo builds them: fp8(randn * 0.5) per value and a scale
// uniform in [0.05, 0.2), from a seed (our own generator, so not the reference's numbers).
std::vector<uint8_t> mock_compressed_keys(int64_t batch, int64_t chunks, uint64_t seed);

// Encodes float keys [rows, 128] as chunks with the given per-row scales (k / scale -> fp8).
std::vector<uint8_t> encode_compressed_keys(std::span<const float> keys, std::span<const float> scales);

// Dequantised key of one chunk: fp8 value * scale, one float32 multiply each.
void dequantize_chunk(const uint8_t* chunk, float* out);

// Throws Error naming the row and chunk of the first NaN fp8 byte or non-finite scale.
void validate_compressed_keys(const CompressedKeysView& keys, const char* what = "compressed_k");
// The same check for one chunk (b, n): the message every backend gives for a bad chunk.
void validate_chunk(const uint8_t* chunk, int64_t b, int64_t n, const char* what = "compressed_k");

}  // namespace flashmem
