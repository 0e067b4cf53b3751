#include "src/loop/setup.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "src/common/error.hpp"
#include "src/common/parallel.hpp"
#include "src/formats/safetensors.hpp"
#include "src/retriever/synthetic.hpp"

namespace flashmem {

CompressedKeysView RunSetup::keys_view() const { return {keys.data(), batch, chunks}; }

std::vector<uint8_t> memory_compressed_keys(const std::vector<float>& memory, int64_t chunks, int64_t hidden,
                                            uint64_t seed) {
  if (static_cast<int64_t>(memory.size()) != chunks * hidden) fail("memory keys: memory is not [N, D]");
  const float amp = static_cast<float>(std::sqrt(3.0 / static_cast<double>(hidden)));
  Eigen::MatrixXf proj(hidden, kKeyDim);  // column j = row j of P
  parallel_for(kKeyDim, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t d = 0; d < hidden; ++d) proj(d, j) = pm1(seed, 15, static_cast<uint64_t>(j * hidden + d)) * amp;
  });
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMat> mem(memory.data(), chunks, hidden);
  RowMat keys = mem * proj;  // [N, 128]
  std::vector<double> rms(chunks);
  for (int64_t n = 0; n < chunks; ++n) rms[n] = std::sqrt(keys.row(n).cast<double>().squaredNorm() / kKeyDim);
  std::vector<double> sorted = rms;
  std::nth_element(sorted.begin(), sorted.begin() + chunks / 2, sorted.end());
  const double median = sorted[chunks / 2];
  const float gain = static_cast<float>(median > 0 ? 0.0625 / median : 1.0);
  keys *= gain;
  std::vector<float> scales(chunks);
  for (int64_t n = 0; n < chunks; ++n) {
    const float amax = keys.row(n).cwiseAbs().maxCoeff();
    scales[n] = amax > 0 ? amax / 448.0f : 1.0f;
  }
  return encode_compressed_keys({keys.data(), static_cast<size_t>(chunks * kKeyDim)}, scales);
}

std::vector<int64_t> make_salient_memory(std::vector<float>& memory, int64_t chunks, int64_t hidden,
                                         double fraction, double gain, uint64_t seed) {
  std::vector<int64_t> order(chunks);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  const int64_t count = std::clamp<int64_t>(std::llround(fraction * static_cast<double>(chunks)), 1, chunks);
  order.resize(count);
  std::sort(order.begin(), order.end());
  for (int64_t n : order)
    for (int64_t d = 0; d < hidden; ++d) memory[n * hidden + d] *= static_cast<float>(gain);
  return order;
}

LoopSettings loop_settings(const RunConfig& cfg) {
  LoopSettings s;
  s.prefill = cfg.loop.prefill, s.steps = cfg.loop.steps, s.tau = cfg.loop.tau;
  s.select = cfg.policy.select == "topk" ? SelectRule::top_k_rule(cfg.policy.top_k)
                                         : SelectRule::threshold_rule(static_cast<float>(cfg.policy.threshold));
  s.rules = {cfg.policy.tail, cfg.policy.sink, cfg.policy.cap};
  s.shadow = cfg.shadow.enabled;
  s.free_running = cfg.shadow.free_running;
  s.seed = static_cast<uint64_t>(cfg.policy.seed);
  return s;
}

RetrieverOptions retriever_options(const RunConfig& cfg) {
  RetrieverOptions o;
  o.max_position = cfg.retriever.max_position;
  o.ensemble = parse_ensemble(cfg.policy.ensemble, "policy.ensemble");
  o.precision = parse_precision(cfg.retriever.precision, "retriever.precision");
  return o;
}

RunSetup prepare_run(RunConfig& cfg) {
  const auto t0 = std::chrono::steady_clock::now();
  cfg.validate();
  RunSetup setup;
  if (cfg.device == "auto") cfg.device = cuda_available() ? "cuda" : "cpu";
  setup.device = parse_device(cfg.device, "device");

  // Decoder weights.
  ToyDecoderWeights dw;
  if (!cfg.model.weights.empty()) {
    dw = load_toy_decoder(cfg.model.weights, cfg.model.heads);
    cfg.model.hidden = dw.hidden, cfg.model.heads = dw.heads, cfg.model.vocab = dw.vocab;
    cfg.model.layers = static_cast<int64_t>(dw.layers.size()), cfg.model.chunks = dw.chunks;
  } else {
    ToyDecoderShape shape{cfg.model.hidden, cfg.model.heads, cfg.model.vocab, cfg.model.layers, cfg.model.chunks};
    dw = synthetic_toy_decoder(static_cast<uint64_t>(cfg.model.seed), shape);
    if (cfg.memory.structure == "salient")
      setup.salient_chunks = make_salient_memory(dw.memory, dw.chunks, dw.hidden, cfg.memory.salient_fraction,
                                                 cfg.memory.salient_gain, static_cast<uint64_t>(cfg.memory.seed));
  }
  const int64_t B = cfg.loop.batch, N = dw.chunks, D = dw.hidden, P = cfg.loop.prefill;

  // Retriever.
  if (!cfg.retriever.checkpoint.empty()) {
    setup.retriever_weights =
        std::make_shared<RetrieverWeights>(load_retriever(cfg.retriever.checkpoint, cfg.retriever.layers));
    cfg.retriever.rank = setup.retriever_weights->rank, cfg.retriever.heads = setup.retriever_weights->heads;
  } else {
    SyntheticShape shape;
    shape.hidden = D, shape.rank = cfg.retriever.rank, shape.heads = cfg.retriever.heads;
    if (!cfg.retriever.layers.empty()) shape.layers = cfg.retriever.layers;
    setup.retriever_weights =
        std::make_shared<RetrieverWeights>(synthetic_retriever(static_cast<uint64_t>(cfg.retriever.seed), shape));
  }
  cfg.retriever.layers.clear();
  for (const auto& layer : setup.retriever_weights->layers) cfg.retriever.layers.push_back(layer.name);
  if (setup.retriever_weights->hidden != D)
    fail("retriever: hidden D = ", setup.retriever_weights->hidden, " does not match model.hidden = ", D);

  // Keys [B, N, 132].
  if (cfg.keys.mode == "mock") {
    setup.keys = mock_compressed_keys(B, N, static_cast<uint64_t>(cfg.keys.seed));
  } else if (cfg.keys.mode == "memory") {
    const std::vector<uint8_t> one = memory_compressed_keys(dw.memory, N, D, static_cast<uint64_t>(cfg.keys.seed));
    setup.keys.resize(static_cast<size_t>(B) * one.size());
    for (int64_t b = 0; b < B; ++b) std::copy(one.begin(), one.end(), setup.keys.begin() + b * one.size());
  } else {
    const SafetensorsFile file = SafetensorsFile::open(cfg.keys.path);
    if (!file.contains(cfg.keys.tensor)) fail("keys.tensor: ", cfg.keys.path, " has no tensor '", cfg.keys.tensor, "'");
    const TensorView& t = file.expect(cfg.keys.tensor, {DType::U8}, {-1, -1, kChunkBytes});
    if (t.shape[0] != B || t.shape[1] != N)
      fail("keys.path: ", cfg.keys.path, ": ", cfg.keys.tensor, " is [", t.shape[0], ", ", t.shape[1],
           ", 132], expected [loop.batch = ", B, ", N = ", N, ", 132]");
    const auto bytes = t.as<uint8_t>();
    setup.keys.assign(bytes.begin(), bytes.end());
  }
  setup.batch = B, setup.chunks = N;
  validate_compressed_keys(setup.keys_view());

  // Prompt [B, P].
  if (!cfg.loop.prompt.empty()) {
    const SafetensorsFile file = SafetensorsFile::open(cfg.loop.prompt);
    if (!file.contains(cfg.loop.prompt_tensor))
      fail("loop.prompt_tensor: ", cfg.loop.prompt, " has no tensor '", cfg.loop.prompt_tensor, "'");
    setup.prompt = file.read_i64(cfg.loop.prompt_tensor);
    const auto& shape = file.tensor(cfg.loop.prompt_tensor).shape;
    if (shape.size() != 2 || shape[0] != B || shape[1] != P)
      fail("loop.prompt: ", cfg.loop.prompt, ": ", cfg.loop.prompt_tensor, " is not [loop.batch = ", B,
           ", loop.prefill = ", P, "]");
  } else {
    std::mt19937_64 rng(static_cast<uint64_t>(cfg.loop.prompt_seed));
    std::uniform_int_distribution<int64_t> tok(0, dw.vocab - 1);
    setup.prompt.resize(B * P);
    for (auto& t : setup.prompt) t = tok(rng);
  }
  for (int64_t t : setup.prompt)
    if (t < 0 || t >= dw.vocab) fail("loop.prompt: token ", t, " is outside the vocabulary [0, ", dw.vocab, ")");

  setup.decoder_weights = std::make_shared<const ToyDecoderWeights>(std::move(dw));
  setup.setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return setup;
}

}  // namespace flashmem
