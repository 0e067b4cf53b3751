// The configuration of `flashmem run`: one typed struct whose defaults ARE the embedded
// default run (configs/default.yaml mirrors them). YAML and `--set a.b=value` only fill it;
// validate() is the one place that checks values, and every error names the key.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace flashmem {

struct RunConfig {
  std::string device = "auto";  // auto | cpu | cuda (auto: cuda when available)

  struct Model {
    std::string weights;  // toy decoder safetensors; empty = seeded synthetic weights
    int64_t hidden = 4096, layers = 2, heads = 8, vocab = 512, chunks = 4096;
    int64_t seed = 1;
  } model;

  // Shape of the synthetic memory (only applied to synthetic weights; a weights file's
  // memory is used as stored).
  struct Memory {
    std::string structure = "salient";  // random | salient
    double salient_fraction = 0.05;     // share of chunks whose memory vector is amplified
    double salient_gain = 2.0;          // their amplification (logit scale)
    int64_t seed = 11;
  } memory;

  struct Retriever {
    std::string checkpoint;  // safetensors; empty = seeded synthetic checkpoint (SPEC 8)
    int64_t seed = 1;        // synthetic only
    int64_t rank = 2048, heads = 128;            // synthetic only (D comes from the model)
    std::vector<std::string> layers;             // empty: all (file) or l10,l12,l20 (synthetic)
    int64_t max_position = 524288;
    std::string precision = "exact";            // exact | fast (CUDA only)
  } retriever;

  struct Keys {
    std::string mode = "memory";     // memory | mock | file
    std::string path;                // mode file: safetensors file
    std::string tensor = "compressed_k";  // mode file: tensor name, [B, N, 132] U8
    int64_t seed = 7;                // mode mock: generator seed; mode memory: projection seed
  } keys;

  struct Loop {
    int64_t batch = 1, prefill = 8, steps = 192, tau = 64;
    std::string prompt;                    // safetensors file with the prompt; empty = seeded
    std::string prompt_tensor = "prefill_ids";  // [B, prefill] I64
    int64_t prompt_seed = 3;
  } loop;

  struct Policy {
    std::string kind = "retriever";  // a registered KeepPolicy: retriever | oracle | recency | random
    std::string select = "threshold";  // threshold | topk (the retriever's own selection)
    int64_t top_k = 512;
    double threshold = 0.5;
    std::string ensemble = "max";  // max | mean
    int64_t tail = 64;   // newest chunks always kept (recency tail)
    int64_t sink = 16;   // oldest chunks always kept (attention sink)
    int64_t cap = 512;   // most chunks kept per row; 0 = no cap
    int64_t seed = 5;    // random policy
  } policy;

  struct Shadow {
    bool enabled = true;        // dense decoder in lockstep, teacher-forced on the same tokens
    bool free_running = true;   // and a dense run on its own tokens (first divergence)
  } shadow;

  struct Output {
    std::string dir;            // run folder; empty = runs/<timestamp>
    std::string trace_tensors;  // safetensors trace file; empty = none
  } output;

  // Throws Error naming the key on the first bad value ("loop.tau: -1 must be > 0").
  void validate() const;
};

// Fills cfg from a YAML mapping (text). Unknown keys and wrong types throw naming the key.
void apply_yaml(RunConfig& cfg, const std::string& yaml_text, const std::string& source = "config");
void load_config_file(RunConfig& cfg, const std::string& path);
// "a.b=value": value parsed as a YAML scalar (or flow sequence) into the same field.
void apply_override(RunConfig& cfg, const std::string& assignment);
// The whole config as YAML (every field, in declaration order).
std::string to_yaml(const RunConfig& cfg);
// Every key path, e.g. "loop.tau" (for help texts and tests).
std::vector<std::string> config_keys();

}  // namespace flashmem
