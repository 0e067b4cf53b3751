// report.svg of a run folder: a plain, self-contained SVG (no scripts, no external fonts or
// images) with three panels:
//   1. the keep-mask raster: one band per window (and batch row), chunk index on x, kept
//      chunks dark, with the window's dense attention mass per chunk as a heat strip under it;
//   2. staleness: recall against the step's offset inside the window (1 .. tau);
//   3. per window: keep ratio, recall and top-1 agreement, and KL(dense || sparse).
// KeepRasterRecorder collects the raster while the loop runs (binned: at most kMaxColumns
// columns and kMaxBands bands, so memory stays small for N = 65536+); render_svg_report is a
// pure function of an SvgReport.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/loop/observer.hpp"

namespace flashmem {

struct KeepRaster {
  int64_t chunks = 0, columns = 0;        // N, and columns after binning (<= kMaxColumns)
  int64_t batch = 0, rows_shown = 0;      // batch rows 0 .. rows_shown-1 are drawn
  int64_t cycles = 0, cycle_stride = 1;   // every cycle_stride-th window is drawn
  struct Band {
    int64_t cycle = 0, row = 0, step_begin = 0, step_end = 0, kept = 0;
    std::vector<double> kept_share;  // [columns] kept chunks / chunks in the column, 0 .. 1
    std::vector<double> mass;        // [columns] dense attention summed over layers, heads, steps
    std::vector<double> missed;      // [columns] the part of mass on chunks not kept
    double recall_sum = 0;           // sum over the window's steps of the row's recall
    int64_t steps = 0;
  };
  std::vector<Band> bands;  // cycle-major, then row
};

class KeepRasterRecorder : public StepObserver {
 public:
  static constexpr int64_t kMaxColumns = 1024, kMaxRows = 8, kMaxBands = 64;
  void on_start(const LoopShape& shape) override;
  void on_cycle(const CycleEvent& ev) override;
  void on_step(const StepEvent& ev) override;
  const KeepRaster& raster() const { return raster_; }

 private:
  LoopShape shape_;
  KeepRaster raster_;
  std::vector<int64_t> column_of_, column_size_;  // [N] column of a chunk, [columns] chunks in it
  int64_t band0_ = -1;              // first band of the current window; -1 = not drawn
};

struct SvgReport {
  std::string policy;  // legend: kind, select, threshold / top-k, tail, sink, cap
  int64_t chunks = 0, batch = 0, tau = 0, steps = 0, cycles = 0;
  bool shadow = false;
  double keep_ratio = 0, recall = 0, kl = 0, top1 = 0, top10 = 0;  // run means
  std::vector<double> recall_by_offset;  // [tau]; NaN = no step at that offset
  struct Cycle {
    double keep_ratio = 0, recall = 0, top1 = 0, kl = 0;
  };
  std::vector<Cycle> per_cycle;
  KeepRaster raster;
};

// From what the metrics collector wrote (summary.json, cycles.jsonl objects) and the resolved
// config YAML (for the policy legend; unparsable text gives an empty legend).
SvgReport make_svg_report(const nlohmann::json& summary, const std::vector<nlohmann::json>& cycles,
                          const KeepRaster& raster, const std::string& config_yaml);

// The SVG document. Never prints NaN or inf (non-finite values are left out or drawn as 0).
std::string render_svg_report(const SvgReport& report);

}  // namespace flashmem
