#include "src/retriever/score_inputs.hpp"

#include <cmath>

#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "src/retriever/synthetic.hpp"

namespace flashmem {

ScoreInputs OwnedScoreInputs::view() const {
  return {hidden, CompressedKeysView{keys.data(), batch, chunks}, positions};
}

OwnedScoreInputs mock_score_inputs(int64_t batch, int64_t chunks, int64_t hidden_dim, uint64_t seed) {
  if (batch <= 0) fail("--batch: ", batch, ", expected at least 1 row");
  if (chunks <= 0) fail("--n-chunks: ", chunks, ", expected at least 1 chunk");
  OwnedScoreInputs in{batch, chunks, hidden_dim, std::vector<float>(batch * hidden_dim),
                      mock_compressed_keys(batch, chunks, seed), std::vector<int64_t>(batch, 4 * chunks - 1)};
  for (int64_t i = 0; i < batch * hidden_dim; i += 2) {  // Box-Muller on counter-based uniforms
    auto uniform = [&](int64_t k) { return (static_cast<double>(splitmix64(~seed * 0x9E37ull + k) >> 11) + 0.5) * 0x1.0p-53; };
    const double r = std::sqrt(-2.0 * std::log(uniform(i))), t = 2.0 * M_PI * uniform(i + 1);
    in.hidden[i] = static_cast<float>(r * std::cos(t));
    if (i + 1 < batch * hidden_dim) in.hidden[i + 1] = static_cast<float>(r * std::sin(t));
  }
  return in;
}

OwnedScoreInputs load_score_inputs(const std::string& path, int64_t hidden_dim) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const TensorView& keys = file.expect("compressed_k", {DType::U8}, {-1, -1, 132});
  const int64_t B = keys.shape[0], N = keys.shape[1];
  if (B == 0) fail(path, ": tensor 'compressed_k' has B = 0 rows, expected at least one");
  if (N == 0) fail(path, ": tensor 'compressed_k' has N = 0 chunks, expected at least one");
  file.expect("hidden", {DType::F32, DType::BF16, DType::F16}, {B, hidden_dim});
  file.expect("positions", {DType::I64}, {B});
  OwnedScoreInputs in{B, N, hidden_dim, file.read_f32("hidden"), {}, file.read_i64("positions")};
  const auto bytes = keys.as<uint8_t>();
  in.keys.assign(bytes.begin(), bytes.end());
  for (int64_t b = 0; b < B; ++b)
    if (in.positions[b] < 0) fail(path, ": tensor 'positions' row ", b, " is ", in.positions[b], ", expected >= 0");
  return in;
}

}  // namespace flashmem
