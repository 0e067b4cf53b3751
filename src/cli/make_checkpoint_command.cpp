// flashmem make-checkpoint: writes the seeded synthetic checkpoint of SPEC 8 to a file.
#include <cstdio>

#include "src/cli/commands.hpp"
#include "src/common/error.hpp"
#include "src/retriever/synthetic.hpp"

namespace flashmem::cli {

void add_make_checkpoint_command(CLI::App& app) {
  struct Options {
    uint64_t seed = 1;
    std::string out, dtype = "F32";
    SyntheticShape shape;
  };
  auto opt = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("make-checkpoint", "Write the seeded synthetic retriever checkpoint (released shapes by default)");
  cmd->add_option("--seed", opt->seed, "Generator seed")->capture_default_str();
  cmd->add_option("--out", opt->out, "Output safetensors file")->required();
  cmd->add_option("--dtype", opt->dtype, "F32 or BF16")->capture_default_str()->check(CLI::IsMember({"F32", "BF16"}));
  cmd->add_option("--hidden", opt->shape.hidden, "D")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--rank", opt->shape.rank, "R")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--heads", opt->shape.heads, "H")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--layers", opt->shape.layers, "Layer names, in stream order")->delimiter(',')->capture_default_str();
  cmd->callback([opt] {
    const RetrieverWeights weights = synthetic_retriever(opt->seed, opt->shape);
    save_retriever(weights, opt->out, opt->dtype == "F32" ? DType::F32 : DType::BF16);
    std::printf("wrote %s: %zu layers, D %lld, R %lld, H %lld, %.1f MB as float32\n", opt->out.c_str(), weights.layers.size(),
                static_cast<long long>(weights.hidden), static_cast<long long>(weights.rank),
                static_cast<long long>(weights.heads), weights.parameter_bytes() / 1e6);
  });
}

}  // namespace flashmem::cli
