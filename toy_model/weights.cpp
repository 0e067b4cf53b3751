// Toy decoder weights: the safetensors loader and the seeded synthetic generator (SPEC 5).
#include <cmath>
#include <string>

#include "src/common/error.hpp"
#include "src/common/parallel.hpp"
#include "src/formats/safetensors.hpp"
#include "src/retriever/synthetic.hpp"
#include "toy_model/decoder.hpp"

namespace flashmem {

namespace {
constexpr int64_t kLayers = 2;

void check_size(const std::vector<float>& v, int64_t expected, const std::string& name) {
  if (static_cast<int64_t>(v.size()) != expected)
    fail("toy decoder: tensor ", name, " has ", v.size(), " values, expected ", expected);
}

// --- synthetic generator ----------------------------------------------------------------
// pm1 (SPEC 8) takes a 32-bit seed, 16 streams and 2^28 indices. The toy decoder has more
// tensors than streams and the memory can hold more than 2^28 values, so every tensor t and
// every 2^28-element block of it gets its own 32-bit seed, derived by splitmix64; stream 0.
constexpr uint64_t kBlockBits = 28;

uint64_t derived_seed(uint64_t seed, uint64_t tensor, uint64_t block) {
  return splitmix64(splitmix64(seed * 0x100000001B3ull + tensor) + block) & 0xFFFFFFFFull;
}

// values[i] = pm1(...) * amplitude + offset (offset 0 adds nothing), filled in parallel.
std::vector<float> generate(uint64_t seed, uint64_t tensor, int64_t count, float amplitude, float offset) {
  std::vector<float> values(count);
  parallel_for((count + 4095) / 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * 4096; i < std::min(end * 4096, count); ++i) {
      const uint64_t u = static_cast<uint64_t>(i);
      const uint64_t s = derived_seed(seed, tensor, u >> kBlockBits);
      values[i] = pm1(s, 0, u & ((uint64_t{1} << kBlockBits) - 1)) * amplitude + offset;
    }
  });
  return values;
}

// Tensor ids: 0 embed, 1 memory, 2 final_norm, 3 lm_head, 16 + 8*layer + {wq, wk, wv, wo,
// mlp_up, mlp_down, attn_norm, mlp_norm}.
enum : uint64_t { kEmbed = 0, kMemory = 1, kFinalNorm = 2, kLmHead = 3, kLayerBase = 16 };
}  // namespace

void validate_toy_decoder(const ToyDecoderWeights& w) {
  const int64_t D = w.hidden, V = w.vocab, N = w.chunks, H = w.heads;
  if (D <= 0 || V <= 0 || N <= 0 || H <= 0) fail("toy decoder: hidden, vocab, chunks and heads must be positive");
  if (D % H != 0) fail("toy decoder: hidden ", D, " is not a multiple of heads ", H);
  if (w.layers.empty()) fail("toy decoder: no layers");
  check_size(w.embed, V * D, "embed.weight");
  check_size(w.memory, N * D, "memory");
  check_size(w.final_norm, D, "final_norm");
  check_size(w.lm_head, V * D, "lm_head.weight");
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const auto& l = w.layers[i];
    const std::string s = "." + std::to_string(i);
    check_size(l.wq, D * D, "wq" + s + ".weight");
    check_size(l.wk, D * D, "wk" + s + ".weight");
    check_size(l.wv, D * D, "wv" + s + ".weight");
    check_size(l.wo, D * D, "wo" + s + ".weight");
    check_size(l.mlp_up, 2 * D * D, "mlp_up" + s + ".weight");
    check_size(l.mlp_down, 2 * D * D, "mlp_down" + s + ".weight");
    check_size(l.attn_norm, D, "attn_norm" + s);
    check_size(l.mlp_norm, D, "mlp_norm" + s);
  }
}

ToyDecoderWeights load_toy_decoder(const std::string& path, int64_t heads) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const std::initializer_list<DType> floats = {DType::F32, DType::BF16, DType::F16};
  const auto& embed = file.expect("embed.weight", floats, {-1, -1});
  const auto& memory = file.expect("memory", floats, {-1, embed.shape[1]});
  ToyDecoderWeights w;
  w.vocab = embed.shape[0];
  w.hidden = embed.shape[1];
  w.chunks = memory.shape[0];
  w.heads = heads;
  const int64_t D = w.hidden, V = w.vocab;
  if (D <= 0 || V <= 0 || w.chunks <= 0) fail(path, ": key 'embed.weight' or 'memory' has an empty dimension");
  if (heads <= 0 || D % heads != 0) fail(path, ": hidden ", D, " (from 'embed.weight') is not a multiple of heads ", heads);

  auto read = [&](const std::string& key, std::vector<int64_t> shape) {
    file.expect(key, floats, std::move(shape));
    return file.read_f32(key);
  };
  w.embed = read("embed.weight", {V, D});
  w.memory = read("memory", {w.chunks, D});
  for (int64_t i = 0; i < kLayers; ++i) {
    const std::string s = "." + std::to_string(i);
    ToyDecoderLayer l;
    l.wq = read("wq" + s + ".weight", {D, D});
    l.wk = read("wk" + s + ".weight", {D, D});
    l.wv = read("wv" + s + ".weight", {D, D});
    l.wo = read("wo" + s + ".weight", {D, D});
    l.mlp_up = read("mlp_up" + s + ".weight", {2 * D, D});
    l.mlp_down = read("mlp_down" + s + ".weight", {D, 2 * D});
    l.attn_norm = read("attn_norm" + s, {D});
    l.mlp_norm = read("mlp_norm" + s, {D});
    w.layers.push_back(std::move(l));
  }
  if (file.contains("wq.2.weight")) fail(path, ": key 'wq.2.weight': the toy decoder has exactly ", kLayers, " layers");
  w.final_norm = read("final_norm", {D});
  w.lm_head = read("lm_head.weight", {V, D});
  validate_toy_decoder(w);
  return w;
}

std::vector<float> synthetic_toy_memory(uint64_t seed, int64_t chunks, int64_t hidden) {
  if (chunks <= 0 || hidden <= 0) fail("synthetic toy memory: chunks and hidden must be positive");
  // rms 1 (uniform on [-sqrt 3, sqrt 3)), like a normalised hidden state.
  return generate(seed, kMemory, chunks * hidden, static_cast<float>(std::sqrt(3.0)), 0.0f);
}

ToyDecoderWeights synthetic_toy_decoder(uint64_t seed, const ToyDecoderShape& shape) {
  const int64_t D = shape.hidden, H = shape.heads, V = shape.vocab, N = shape.chunks;
  if (D <= 0 || H <= 0 || V <= 0 || N <= 0 || shape.layers <= 0)
    fail("synthetic toy decoder: hidden, heads, vocab, layers and chunks must be positive");
  if (D % H != 0) fail("synthetic toy decoder: hidden ", D, " is not a multiple of heads ", H);
  // Scales (uniform pm1 * a has variance a^2/3): with an input of rms 1, a [out, in] matrix of
  // amplitude sqrt(3/in) gives outputs of rms 1, whatever D is.
  //  - embed rms 1, so the token dominates x and the argmax follows the input token (a
  //    random map over the vocabulary, not a constant);
  //  - wq twice that: q rms 2, k rms 1, so the attention logits q.k/sqrt(hs) have std ~2
  //    over chunks and the softmax is neither uniform nor one-hot;
  //  - wv, wo, mlp_up rms-preserving, mlp_down over 2D inputs; norms 1 +- 0.1;
  //  - lm_head rms-preserving: logits std ~1 over the vocabulary.
  const float unit = static_cast<float>(std::sqrt(3.0 / D));
  const float unit2 = static_cast<float>(std::sqrt(3.0 / (2.0 * D)));
  const float query = static_cast<float>(2.0 * std::sqrt(3.0 / D));
  ToyDecoderWeights w;
  w.hidden = D;
  w.heads = H;
  w.vocab = V;
  w.chunks = N;
  w.embed = generate(seed, kEmbed, V * D, static_cast<float>(std::sqrt(3.0)), 0.0f);
  w.memory = synthetic_toy_memory(seed, N, D);
  for (int64_t i = 0; i < shape.layers; ++i) {
    const uint64_t t = kLayerBase + 8 * static_cast<uint64_t>(i);
    ToyDecoderLayer l;
    l.wq = generate(seed, t + 0, D * D, query, 0.0f);
    l.wk = generate(seed, t + 1, D * D, unit, 0.0f);
    l.wv = generate(seed, t + 2, D * D, unit, 0.0f);
    l.wo = generate(seed, t + 3, D * D, unit, 0.0f);
    l.mlp_up = generate(seed, t + 4, 2 * D * D, unit, 0.0f);
    l.mlp_down = generate(seed, t + 5, 2 * D * D, unit2, 0.0f);
    l.attn_norm = generate(seed, t + 6, D, 0.1f, 1.0f);
    l.mlp_norm = generate(seed, t + 7, D, 0.1f, 1.0f);
    w.layers.push_back(std::move(l));
  }
  w.final_norm = generate(seed, kFinalNorm, D, 0.1f, 1.0f);
  w.lm_head = generate(seed, kLmHead, V * D, unit, 0.0f);
  return w;
}

}  // namespace flashmem
