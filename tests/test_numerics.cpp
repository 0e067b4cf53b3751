// Numerics against fixtures/numerics.safetensors (made by the PyTorch reference) and
// against the spec's closed forms. Everything here is exact: the expected values are
// bit patterns, so any difference is a bug.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "src/formats/safetensors.hpp"
#include "src/numerics/bf16.hpp"
#include "src/numerics/fp8.hpp"
#include "src/numerics/hadamard.hpp"
#include "src/numerics/rmsnorm.hpp"
#include "src/numerics/rope.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;

namespace {
uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
}  // namespace

TEST_CASE("fp8 e4m3fn decode matches the reference for all 256 bytes") {
  const auto file = SafetensorsFile::open(testing::fixture("numerics.safetensors"));
  const auto bytes = file.tensor("fp8_decode.bytes").as<uint8_t>();
  const auto values = file.tensor("fp8_decode.values").as<float>();
  REQUIRE(bytes.size() == 256);
  for (size_t i = 0; i < bytes.size(); ++i) {
    const float ours = fp8_e4m3fn_decode(bytes[i]);
    if (std::isnan(values[i])) {
      CHECK(std::isnan(ours));
      CHECK(fp8_e4m3fn_is_nan(bytes[i]));
    } else {
      CHECK_MESSAGE(bits_of(ours) == bits_of(values[i]), "byte ", int(bytes[i]));  // -0 included
      CHECK(fp8_e4m3fn_table()[bytes[i]] == ours);
    }
  }
}

TEST_CASE("fp8 e4m3fn encode matches the reference bit for bit, past 448 and at infinities too") {
  const auto file = SafetensorsFile::open(testing::fixture("numerics.safetensors"));
  const auto values = file.tensor("fp8_encode.values").as<float>();
  const auto bytes = file.tensor("fp8_encode.bytes").as<uint8_t>();
  REQUIRE(values.size() == bytes.size());
  int mismatches = 0, past_448 = 0, infinities = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    if (fp8_e4m3fn_encode(values[i]) != bytes[i]) {
      ++mismatches;
      MESSAGE("value ", values[i], " ours ", int(fp8_e4m3fn_encode(values[i])), " reference ", int(bytes[i]));
    }
    past_448 += std::fabs(values[i]) > 448.0f;
    infinities += std::isinf(values[i]);
  }
  CHECK(mismatches == 0);
  CHECK(past_448 > 0);  // the table really exercises the documented overflow choice
  CHECK(infinities >= 2);
}

TEST_CASE("fp8 encode documented choices: up to 464 rounds to <= 448, above is NaN, inf is NaN") {
  CHECK(fp8_e4m3fn_encode(448.0f) == 0x7E);
  CHECK(fp8_e4m3fn_encode(464.0f) == 0x7E);  // halfway to the (NaN) next step: ties to even, 448
  CHECK(fp8_e4m3fn_encode(465.0f) == 0x7F);
  CHECK(fp8_e4m3fn_encode(480.0f) == 0x7F);
  CHECK(fp8_e4m3fn_encode(-INFINITY) == 0xFF);
  // round trip of every finite byte
  for (int b = 0; b < 256; ++b)
    if (!fp8_e4m3fn_is_nan(uint8_t(b)) && b != 0x80) CHECK(fp8_e4m3fn_encode(fp8_e4m3fn_decode(uint8_t(b))) == b);
}

TEST_CASE("bf16 round-to-nearest-even matches the reference bit patterns") {
  const auto file = SafetensorsFile::open(testing::fixture("numerics.safetensors"));
  const auto values = file.tensor("bf16.values").as<float>();
  const auto bits = file.tensor("bf16.bits").as<int16_t>();
  REQUIRE(values.size() == bits.size());
  int mismatches = 0;
  for (size_t i = 0; i < values.size(); ++i) mismatches += bf16_bits_from_float(values[i]) != static_cast<uint16_t>(bits[i]);
  CHECK(mismatches == 0);
}

TEST_CASE("YaRN frequencies follow the spec's closed form (independent float64 evaluation)") {
  // corr(32) = 15.x -> low 15, corr(1) = 24.x -> high 25 (SPEC 3).
  const auto& f = yarn_frequencies();
  for (int i = 0; i < kRopePairs; ++i) {
    const double freq = 1.0 / std::pow(160000.0, 2.0 * i / 64.0);
    const double ramp = i < 15 ? 0.0 : (i >= 25 ? 1.0 : (i - 15) / 10.0);
    const double mixed = freq * (1 - ramp) + freq / 16 * ramp;
    // float32 evaluation of pow and three products: a few ulp at most.
    CHECK(testing::close(f[i], mixed, 0.0, 4e-7));
  }
  CHECK(f[0] == 1.0f);
}

TEST_CASE("RoPE clamps positions and rotates pairs") {
  const RopeAngles a = rope_at(10'000'000, 4096), b = rope_at(4095, 4096), z = rope_at(-5, 4096);
  for (int i = 0; i < kRopePairs; ++i) {
    CHECK(a.cos[i] == b.cos[i]);
    CHECK(a.sin[i] == b.sin[i]);
    CHECK(z.cos[i] == 1.0f);
    CHECK(z.sin[i] == 0.0f);
  }
  std::vector<float> x(64, 0.0f);
  x[0] = 1.0f;  // pair 0 = 1 + 0i -> (cos, sin)
  apply_rope(std::span<float, 64>(x.data(), 64), b);
  CHECK(x[0] == b.cos[0]);
  CHECK(x[1] == b.sin[0]);
}

TEST_CASE("Walsh-Hadamard equals the Sylvester matrix product in float64 and is an involution") {
  std::vector<float> x(128);
  for (int i = 0; i < 128; ++i) x[i] = std::sin(0.37 * i) + 0.01f * i;
  std::vector<float> y = x;
  hadamard_128(std::span<float, 128>(y.data(), 128));
  for (int r = 0; r < 128; ++r) {
    double acc = 0;
    for (int c = 0; c < 128; ++c) acc += (__builtin_popcount(r & c) % 2 ? -1.0 : 1.0) * x[c];
    // 7 rounds of float32 additions over |x| <= 2.3: error well below 1e-5.
    CHECK(testing::close(y[r], acc / std::sqrt(128.0), 1e-5, 1e-5));
  }
  hadamard_128(std::span<float, 128>(y.data(), 128));
  for (int i = 0; i < 128; ++i) CHECK(testing::close(y[i], x[i], 1e-5, 1e-5));
}

TEST_CASE("RMSNorm matches a float64 evaluation") {
  std::vector<float> x = {1.5f, -2.0f, 0.25f, 3.0f, -0.5f}, w = {1.0f, 0.5f, 2.0f, -1.0f, 1.25f}, out(5);
  rmsnorm(x, w, out);
  double ms = 0;
  for (float v : x) ms += double(v) * v;
  ms /= 5;
  for (int i = 0; i < 5; ++i) CHECK(testing::close(out[i], x[i] / std::sqrt(ms + 1e-6) * w[i], 0.0, 1e-6));
}
