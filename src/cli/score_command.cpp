// flashmem score: the reference demo in C++. Scores mock (or the user's own) compressed
// chunks with every retriever layer, ensembles, selects, prints statistics, and optionally
// writes the scores and masks to safetensors with the fixtures' names.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>

#include "src/cli/commands.hpp"
#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "src/numerics/rope.hpp"
#include "src/retriever/retriever.hpp"
#include "src/retriever/score_inputs.hpp"
#include "src/retriever/synthetic.hpp"

namespace flashmem::cli {

namespace {

struct ScoreOptions {
  std::string ckpt, inputs, out, ensemble = "max", device = "auto", precision = "exact";
  std::vector<std::string> layers;
  int64_t batch = 2, chunks = 4096, top_k = 64, max_position = kDefaultMaxPosition;
  float threshold = 0.5f;
  uint64_t seed = 1;
};

struct Stats {
  double mean = 0, min = 0, max = 0, above = 0;
};

Stats stats_of(const std::vector<float>& values, float threshold) {
  Stats s{0, values[0], values[0], 0};
  for (float v : values) {
    s.mean += v;
    s.min = std::min<double>(s.min, v);
    s.max = std::max<double>(s.max, v);
    s.above += v > threshold;
  }
  s.mean /= values.size();
  s.above /= values.size();
  return s;
}

std::string number_label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

Device resolve_device(const std::string& text) {
  if (text == "auto") return cuda_available() ? Device::Cuda : Device::Cpu;
  return parse_device(text, "--device");
}

void run_score(const ScoreOptions& opt) {
  SelectRule::threshold_rule(opt.threshold).validate();
  SelectRule::top_k_rule(opt.top_k).validate();
  RetrieverOptions ropt;
  ropt.max_position = opt.max_position;
  ropt.ensemble = parse_ensemble(opt.ensemble, "--ensemble");
  ropt.precision = parse_precision(opt.precision, "--precision");
  ropt.validate();
  const Device device = resolve_device(opt.device);

  std::shared_ptr<const RetrieverWeights> weights;
  std::string source;
  if (opt.ckpt.empty()) {
    SyntheticShape shape;
    if (!opt.layers.empty()) shape.layers = opt.layers;
    weights = std::make_shared<RetrieverWeights>(synthetic_retriever(opt.seed, shape));
    source = "synthetic checkpoint, seed " + std::to_string(opt.seed);
  } else {
    weights = std::make_shared<RetrieverWeights>(load_retriever(opt.ckpt, opt.layers));
    source = opt.ckpt;
  }
  const OwnedScoreInputs in = opt.inputs.empty() ? mock_score_inputs(opt.batch, opt.chunks, weights->hidden, opt.seed)
                                                 : load_score_inputs(opt.inputs, weights->hidden);
  auto retriever = make_retriever(device, weights, ropt);

  std::printf("retriever: %s (%s backend) | layers", source.c_str(), retriever->backend());
  for (const auto& l : weights->layers) std::printf(" %s", l.name.c_str());
  std::printf(" | D %lld  R %lld  H %lld\n", (long long)weights->hidden, (long long)weights->rank, (long long)weights->heads);
  std::printf("inputs: %s | B %lld  N %lld | positions", opt.inputs.empty() ? "mock compressed_k" : opt.inputs.c_str(),
              (long long)in.batch, (long long)in.chunks);
  for (int64_t p : in.positions) std::printf(" %lld", (long long)p);
  std::printf(" (max_position %lld)\n", (long long)opt.max_position);

  const auto t0 = std::chrono::steady_clock::now();
  const Scores scores = retriever->score(in.view(), true);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  for (size_t l = 0; l < weights->layers.size(); ++l) {
    std::vector<float> sig(scores.layer_logits[l].size());
    std::transform(scores.layer_logits[l].begin(), scores.layer_logits[l].end(), sig.begin(), sigmoid);
    const Stats s = stats_of(sig, opt.threshold);
    std::printf("layer %-4s score mean %.4f  min %.4f  max %.4f  > %g: %5.1f%%\n", weights->layers[l].name.c_str(), s.mean,
                s.min, s.max, opt.threshold, 100 * s.above);
  }
  const Stats e = stats_of(scores.ensemble, opt.threshold);
  std::printf("ensemble %-4s mean %.4f  min %.4f  max %.4f\n", opt.ensemble.c_str(), e.mean, e.min, e.max);

  const Selection thr = select_chunks(scores.ensemble, in.batch, in.chunks, SelectRule::threshold_rule(opt.threshold));
  const Selection top = select_chunks(scores.ensemble, in.batch, in.chunks, SelectRule::top_k_rule(opt.top_k));
  const int64_t k = std::min(opt.top_k, in.chunks);
  for (int64_t b = 0; b < in.batch; ++b) {
    std::printf("row %lld: score > %g keeps %lld / %lld chunks (%.1f%%) | top-%lld:", (long long)b, opt.threshold,
                (long long)thr.kept_count[b], (long long)in.chunks, 100.0 * thr.kept_count[b] / in.chunks, (long long)k);
    for (int64_t i = 0; i < std::min<int64_t>(k, 16); ++i) std::printf(" %lld", (long long)top.top_indices[b * k + i]);
    std::printf("%s\n", k > 16 ? " ..." : "");
  }
  std::printf("scored %lld chunks x %zu layers in %.2f ms\n", (long long)(in.batch * in.chunks), weights->layers.size(), ms);

  if (!opt.out.empty()) {
    SafetensorsWriter writer;
    const std::vector<int64_t> bn = {in.batch, in.chunks};
    for (size_t l = 0; l < weights->layers.size(); ++l)
      writer.add_f32(weights->layers[l].name + ".logits", bn, scores.layer_logits[l]);
    for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
      const std::string tag = ensemble_name(ens);
      const std::vector<float> ensembled = ensemble_from_logits(scores.layer_logits, ens);
      writer.add_f32("ensemble_" + tag, bn, ensembled);
      writer.add_u8("keep_thr" + number_label(opt.threshold) + "_" + tag, bn,
                    select_chunks(ensembled, in.batch, in.chunks, SelectRule::threshold_rule(opt.threshold)).keep);
      writer.add_u8("keep_top" + std::to_string(opt.top_k) + "_" + tag, bn,
                    select_chunks(ensembled, in.batch, in.chunks, SelectRule::top_k_rule(opt.top_k)).keep);
    }
    if (opt.inputs.empty()) {  // mock inputs travel with the scores, so the run can be replayed
      writer.add_f32("hidden", {in.batch, in.hidden_dim}, in.hidden);
      writer.add_u8("compressed_k", {in.batch, in.chunks, kChunkBytes}, in.keys);
      writer.add_i64("positions", {in.batch}, in.positions);
    }
    writer.write(opt.out);
    std::printf("wrote %s\n", opt.out.c_str());
  }
}

}  // namespace

void add_score_command(CLI::App& app) {
  auto opt = std::make_shared<ScoreOptions>();
  auto* cmd = app.add_subcommand("score", "Score compressed KV chunks with the retriever (the reference demo)");
  cmd->add_option("--ckpt", opt->ckpt, "Retriever checkpoint (safetensors); default: the seeded synthetic one");
  cmd->add_option("--inputs", opt->inputs, "Score your own tensors: hidden [B,D], compressed_k [B,N,132] U8, positions [B] I64");
  cmd->add_option("--out", opt->out, "Write logits, ensembles and masks to this safetensors file");
  cmd->add_option("--batch", opt->batch, "Mock inputs: rows B")->capture_default_str();
  cmd->add_option("--n-chunks", opt->chunks, "Mock inputs: chunks N")->capture_default_str();
  cmd->add_option("--top-k", opt->top_k, "Chunks kept by the top-k selection")->capture_default_str();
  cmd->add_option("--threshold", opt->threshold, "Threshold selection keeps score > t, t in [0, 1]")->capture_default_str();
  cmd->add_option("--ensemble", opt->ensemble, "Layer ensemble: max or mean")->capture_default_str();
  cmd->add_option("--max-position", opt->max_position, "RoPE table length (positions are clamped below it)")->capture_default_str();
  cmd->add_option("--layers", opt->layers, "Layers to use, in this order (default: all, string-sorted)")->delimiter(',');
  cmd->add_option("--seed", opt->seed, "Seed of the synthetic checkpoint and the mock inputs")->capture_default_str();
  cmd->add_option("--device", opt->device, "cpu, cuda, or auto (cuda when a GPU is present)")->capture_default_str();
  cmd->add_option("--precision", opt->precision, "CUDA scoring precision: exact or fast")->capture_default_str();
  cmd->callback([opt] { run_score(*opt); });
}

}  // namespace flashmem::cli
