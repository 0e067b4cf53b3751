// flashmem run: the sparse decode loop with its dense shadow (configs/default.yaml; with no
// file, the embedded default: seeded synthetic retriever and decoder). Prints a line per
// cycle and a summary, and writes a run folder (cycles.jsonl, steps.csv, summary.json,
// config.yaml).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "src/cli/commands.hpp"
#include "src/common/error.hpp"
#include "src/loop/config.hpp"
#include "src/loop/loop.hpp"
#include "src/loop/report.hpp"
#include "src/loop/setup.hpp"

namespace flashmem::cli {

namespace {

std::string fmt_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

struct RunOptions {
  std::string config_file, device, out, trace;
  std::vector<std::string> sets;
  bool quiet = false;
};

void run_main(const RunOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  RunConfig cfg;
  if (!opt.config_file.empty()) load_config_file(cfg, opt.config_file);
  for (const auto& s : opt.sets) apply_override(cfg, s);
  if (!opt.device.empty()) cfg.device = opt.device;
  if (!opt.out.empty()) cfg.output.dir = opt.out;
  if (!opt.trace.empty()) cfg.output.trace_tensors = opt.trace;
  cfg.validate();
  if (cfg.output.dir.empty()) cfg.output.dir = default_run_dir();
  if (std::filesystem::exists(cfg.output.dir))
    fail("output.dir: ", cfg.output.dir, " already exists (choose a new folder)");

  RunSetup setup = prepare_run(cfg);
  const auto& dw = *setup.decoder_weights;
  const auto& rw = *setup.retriever_weights;
  std::printf("flashmem run: device %s; decoder D %lld, %zu layers, %lld heads, vocab %lld, N %lld chunks (%s)\n",
              cfg.device.c_str(), static_cast<long long>(dw.hidden), dw.layers.size(), static_cast<long long>(dw.heads),
              static_cast<long long>(dw.vocab), static_cast<long long>(dw.chunks),
              cfg.model.weights.empty() ? "seeded" : cfg.model.weights.c_str());
  std::printf("  retriever %s: %zu layers, R %lld, H %lld; keys %s; memory %s", cfg.retriever.checkpoint.empty() ? "seeded" : cfg.retriever.checkpoint.c_str(),
              rw.layers.size(), static_cast<long long>(rw.rank), static_cast<long long>(rw.heads), cfg.keys.mode.c_str(),
              cfg.model.weights.empty() ? cfg.memory.structure.c_str() : "as stored");
  if (!setup.salient_chunks.empty())
    std::printf(" (%zu chunks x%g)", setup.salient_chunks.size(), cfg.memory.salient_gain);
  std::printf("\n  B %lld, prefill %lld, steps %lld, tau %lld; policy %s, select %s, ensemble %s, tail %lld, sink %lld, cap %lld; setup %.1f s\n",
              static_cast<long long>(cfg.loop.batch), static_cast<long long>(cfg.loop.prefill),
              static_cast<long long>(cfg.loop.steps), static_cast<long long>(cfg.loop.tau), cfg.policy.kind.c_str(),
              cfg.policy.select == "topk" ? ("topk " + std::to_string(cfg.policy.top_k)).c_str()
                                          : ("threshold " + fmt_g(cfg.policy.threshold)).c_str(),
              cfg.policy.ensemble.c_str(), static_cast<long long>(cfg.policy.tail), static_cast<long long>(cfg.policy.sink),
              static_cast<long long>(cfg.policy.cap), setup.setup_s);
  std::fflush(stdout);

  auto decoder = make_decoder(setup.device, setup.decoder_weights);
  auto retriever = make_retriever(setup.device, setup.retriever_weights, retriever_options(cfg));
  auto policy = make_keep_policy(cfg.policy.kind);

  MetricsCollector metrics(opt.quiet ? nullptr : stdout);
  ProgressLine progress(!opt.quiet && ::isatty(STDERR_FILENO));
  std::vector<StepObserver*> observers{&metrics, &progress};
  std::unique_ptr<TraceRecorder> trace;
  if (!cfg.output.trace_tensors.empty()) {
    trace = std::make_unique<TraceRecorder>(cfg.output.trace_tensors, setup.keys, cfg.policy.top_k, cfg.retriever.max_position);
    observers.push_back(trace.get());
  }

  LoopInputs in{decoder.get(), retriever.get(), setup.keys_view(), setup.prompt};
  const LoopResult result = run_decode_loop(loop_settings(cfg), in, *policy, observers);
  std::printf("%s", metrics.summary_text().c_str());

  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  metrics.annotate("policy", cfg.policy.kind);
  metrics.annotate("device", cfg.device);
  metrics.annotate("setup_s", setup.setup_s);
  metrics.annotate("wall_s", wall);
  metrics.annotate("salient_chunks", setup.salient_chunks.size());
  write_run_folder(cfg.output.dir, metrics, to_yaml(cfg));
  std::printf("  wall %.1f s (setup %.1f, decoder %.1f, retriever %.1f, oracle %.1f); wrote %s%s%s\n", wall, setup.setup_s,
              result.timings.decoder_s, result.timings.retriever_s, result.timings.oracle_s, cfg.output.dir.c_str(),
              trace ? " and " : "", trace ? cfg.output.trace_tensors.c_str() : "");
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto opt = std::make_shared<RunOptions>();
  auto* cmd = app.add_subcommand("run", "Run the sparse decode loop with its dense shadow and write a run folder");
  cmd->add_option("config", opt->config_file, "YAML config (default: the embedded default, see configs/default.yaml)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--set", opt->sets, "Override a config field: key=value (repeatable), e.g. loop.tau=32");
  cmd->add_option("--device", opt->device, "cpu or cuda (default: cuda if available, else cpu)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--out", opt->out, "Run folder (default: runs/<timestamp>)");
  cmd->add_option("--trace-tensors", opt->trace, "Write tokens, hidden states, cycle scores and masks (fixture names)");
  cmd->add_flag("--quiet", opt->quiet, "No per-cycle lines and no progress line");
  cmd->callback([opt] { run_main(*opt); });
}

}  // namespace flashmem::cli
