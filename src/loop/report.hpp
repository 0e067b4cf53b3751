// Observers of the decode loop that `flashmem run` uses: the metrics collector (per-cycle
// lines, cycles.jsonl, steps.csv, summary.json), the trace recorder (fixture-named
// safetensors) and a progress line. Plus the run folder writer.
#pragma once
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/loop/observer.hpp"
#include "src/loop/svg_report.hpp"

namespace flashmem {

class MetricsCollector : public StepObserver {
 public:
  // Per-cycle lines go to `console` (nullptr = none).
  explicit MetricsCollector(std::FILE* console = nullptr) : console_(console) {}
  void on_start(const LoopShape& shape) override;
  void on_cycle(const CycleEvent& ev) override;
  void on_step(const StepEvent& ev) override;
  void on_finish(const LoopResult& result) override;

  const std::vector<nlohmann::json>& cycles() const { return cycles_; }
  const std::string& steps_csv() const { return csv_; }
  const nlohmann::json& summary() const { return summary_; }
  const KeepRaster& keep_raster() const { return raster_.raster(); }  // for report.svg
  // Adds a field to summary.json (run-level facts the loop does not know).
  void annotate(const std::string& key, nlohmann::json value) { summary_[key] = std::move(value); }
  // The end-of-run summary as printed lines.
  std::string summary_text() const;

 private:
  void close_cycle();
  struct Acc {  // one window's sums over steps and rows
    int64_t cycle = -1, step = 0, window = 0, row_steps = 0, top1 = 0, empty = 0;
    std::vector<int64_t> kept, retriever_kept, query_positions;
    double score_mean = 0, score_max = 0, kept_fraction = 0, recall = 0, kl = 0, kl_max = 0, top10 = 0;
    std::vector<double> recall_layer;
    int64_t last_step = 0;
  };
  std::FILE* console_;
  KeepRasterRecorder raster_;
  LoopShape shape_;
  Acc acc_;
  std::vector<nlohmann::json> cycles_;
  std::string csv_;
  nlohmann::json summary_;
  // Run totals.
  int64_t row_steps_ = 0, top1_ = 0, empty_ = 0;
  double kept_fraction_ = 0, recall_ = 0, kl_ = 0, top10_ = 0;
  std::vector<double> recall_layer_, stale_sum_;
  std::vector<int64_t> stale_count_;
};

// Records tensors under the fixture's names (tokens, hidden, cycle_scores, cycle_keep,
// compressed_k, prefill_ids, config) and writes them at the end.
class TraceRecorder : public StepObserver {
 public:
  TraceRecorder(std::string path, std::vector<uint8_t> keys, int64_t top_k, int64_t max_position)
      : path_(std::move(path)), keys_(std::move(keys)), top_k_(top_k), max_position_(max_position) {}
  void on_start(const LoopShape& shape) override { shape_ = shape; }
  void on_prefill(const PrefillEvent& ev) override { prompt_.assign(ev.prompt.begin(), ev.prompt.end()); }
  void on_cycle(const CycleEvent& ev) override;
  void on_step(const StepEvent& ev) override;
  void on_finish(const LoopResult& result) override;

 private:
  std::string path_;
  std::vector<uint8_t> keys_;
  int64_t top_k_, max_position_;
  LoopShape shape_;
  std::vector<int64_t> prompt_, tokens_;
  std::vector<float> hidden_, scores_;
  std::vector<uint8_t> keep_;
};

// "step t/T" on stderr, redrawn in place; only when enabled (stderr is a terminal).
class ProgressLine : public StepObserver {
 public:
  explicit ProgressLine(bool enabled) : enabled_(enabled) {}
  void on_start(const LoopShape& shape) override { steps_ = shape.steps; }
  void on_step(const StepEvent& ev) override;
  void on_finish(const LoopResult&) override;

 private:
  bool enabled_;
  int64_t steps_ = 0;
};

// Writes cycles.jsonl, steps.csv, summary.json, config.yaml and report.svg into a temp folder next to
// `dir`, then renames it to `dir` (no partial folder on error). `dir` must not exist.
void write_run_folder(const std::string& dir, const MetricsCollector& metrics, const std::string& config_yaml);
// runs/<YYYYmmdd-HHMMSS>[-k], not existing yet.
std::string default_run_dir();

}  // namespace flashmem
