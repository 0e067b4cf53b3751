#include "src/loop/report.hpp"

#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <numeric>
#include <sstream>

#include "src/common/atomic_file.hpp"
#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"

namespace flashmem {

namespace {
std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}
}  // namespace

// ---- MetricsCollector ----

void MetricsCollector::on_start(const LoopShape& shape) {
  shape_ = shape;
  raster_.on_start(shape);
  recall_layer_.assign(shape.layers, 0.0);
  stale_sum_.assign(shape.tau, 0.0);
  stale_count_.assign(shape.tau, 0);
  std::ostringstream head;
  head << "step,row,position,input_token,token,kept";
  if (shape.shadow) {
    head << ",dense_token,recall";
    for (int64_t l = 0; l < shape.layers; ++l) head << ",recall_l" << l;
    head << ",kl,top1,top10_mass";
  }
  if (shape.free_running) head << ",free_token";
  head << ",empty\n";
  csv_ = head.str();
}

void MetricsCollector::on_cycle(const CycleEvent& ev) {
  close_cycle();
  raster_.on_cycle(ev);
  const int64_t B = shape_.batch, N = shape_.chunks;
  acc_ = Acc{};
  acc_.cycle = ev.cycle, acc_.step = ev.step, acc_.window = ev.window, acc_.last_step = ev.step;
  acc_.query_positions.assign(ev.query_positions.begin(), ev.query_positions.end());
  acc_.recall_layer.assign(shape_.layers, 0.0);
  acc_.kept.assign(B, 0);
  acc_.retriever_kept.assign(B, 0);
  double sum = 0, mx = -1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      acc_.kept[b] += ev.keep[b * N + n];
      acc_.retriever_kept[b] += ev.retriever_keep[b * N + n];
      sum += ev.scores[b * N + n];
      mx = std::max(mx, static_cast<double>(ev.scores[b * N + n]));
    }
  acc_.score_mean = sum / static_cast<double>(B * N);
  acc_.score_max = mx;
}

void MetricsCollector::on_step(const StepEvent& ev) {
  raster_.on_step(ev);
  const int64_t B = shape_.batch, N = shape_.chunks;
  std::ostringstream row;
  row.precision(9);
  for (int64_t b = 0; b < B; ++b) {
    const RowMeasures& m = ev.measures[b];
    const double kept_fraction = static_cast<double>(m.kept) / static_cast<double>(N);
    acc_.kept_fraction += kept_fraction, kept_fraction_ += kept_fraction;
    acc_.row_steps += 1, row_steps_ += 1;
    if (m.empty) acc_.empty += 1, empty_ += 1;
    row << ev.step << ',' << b << ',' << ev.positions[b] << ',' << ev.input_tokens[b] << ',' << ev.tokens[b] << ','
        << m.kept;
    if (shape_.shadow) {
      acc_.recall += m.recall, recall_ += m.recall;
      for (int64_t l = 0; l < shape_.layers; ++l)
        acc_.recall_layer[l] += m.recall_per_layer[l], recall_layer_[l] += m.recall_per_layer[l];
      acc_.kl += m.kl, kl_ += m.kl;
      acc_.kl_max = std::max(acc_.kl_max, m.kl);
      acc_.top1 += m.top1, top1_ += m.top1;
      acc_.top10 += m.top10_mass, top10_ += m.top10_mass;
      stale_sum_[ev.offset - 1] += m.recall, stale_count_[ev.offset - 1] += 1;
      row << ',' << ev.dense_tokens[b] << ',' << m.recall;
      for (double r : m.recall_per_layer) row << ',' << r;
      row << ',' << m.kl << ',' << (m.top1 ? 1 : 0) << ',' << m.top10_mass;
    }
    if (shape_.free_running) row << ',' << ev.free_tokens[b];
    row << ',' << (m.empty ? 1 : 0) << '\n';
  }
  csv_ += row.str();
  acc_.last_step = ev.step;
}

void MetricsCollector::close_cycle() {
  if (acc_.cycle < 0) return;
  const int64_t B = shape_.batch, N = shape_.chunks, P = shape_.prefill;
  const double rs = std::max<int64_t>(acc_.row_steps, 1);
  nlohmann::json j;
  j["cycle"] = acc_.cycle;
  j["step_begin"] = acc_.step;
  j["step_end"] = acc_.last_step;
  j["position_begin"] = P + acc_.step;
  j["position_end"] = P + acc_.last_step;
  j["query_positions"] = acc_.query_positions;
  j["chunks"] = N;
  j["kept"] = acc_.kept;
  j["retriever_kept"] = acc_.retriever_kept;
  j["kept_fraction"] = acc_.kept_fraction / rs;
  j["score_mean"] = acc_.score_mean;
  j["score_max"] = acc_.score_max;
  j["empty_row_steps"] = acc_.empty;
  if (shape_.shadow) {
    j["recall"] = acc_.recall / rs;
    std::vector<double> per_layer(acc_.recall_layer);
    for (double& r : per_layer) r /= rs;
    j["recall_per_layer"] = per_layer;
    j["kl_mean"] = acc_.kl / rs;
    j["kl_max"] = acc_.kl_max;
    j["top1_agreement"] = static_cast<double>(acc_.top1) / rs;
    j["dense_top10_mass"] = acc_.top10 / rs;
  }
  cycles_.push_back(j);
  if (console_) {
    std::ostringstream line;
    line << "cycle " << acc_.cycle << "  pos " << P + acc_.step << ".." << P + acc_.last_step << "  kept ";
    if (B <= 4) {
      for (int64_t b = 0; b < B; ++b) line << (b ? "," : "") << acc_.kept[b];
    } else {
      line << fmt("%.1f", std::accumulate(acc_.kept.begin(), acc_.kept.end(), 0.0) / B);
    }
    line << "/" << N << " (" << fmt("%.1f", 100.0 * acc_.kept_fraction / rs) << "%)"
         << "  score mean " << fmt("%.4f", acc_.score_mean) << " max " << fmt("%.4f", acc_.score_max);
    if (shape_.shadow) {
      line << " | recall " << fmt("%.3f", acc_.recall / rs) << " (";
      for (int64_t l = 0; l < shape_.layers; ++l)
        line << (l ? " " : "") << "l" << l << " " << fmt("%.3f", acc_.recall_layer[l] / rs);
      line << ")  KL " << fmt("%.4g", acc_.kl / rs) << "  top1 " << fmt("%.1f", 100.0 * acc_.top1 / rs) << "%";
    }
    if (acc_.empty) line << "  empty " << acc_.empty;
    std::fprintf(console_, "%s\n", line.str().c_str());
  }
  acc_ = Acc{};
}

void MetricsCollector::on_finish(const LoopResult& result) {
  close_cycle();
  const double rs = std::max<int64_t>(row_steps_, 1);
  nlohmann::json& s = summary_;
  s["steps"] = result.steps;
  s["cycles"] = result.cycles;
  s["batch"] = shape_.batch;
  s["chunks"] = shape_.chunks;
  s["tau"] = shape_.tau;
  s["average_keep_ratio"] = kept_fraction_ / rs;
  s["share_not_kept"] = 1.0 - kept_fraction_ / rs;
  s["empty_row_steps"] = empty_;
  if (shape_.shadow) {
    s["recall"] = recall_ / rs;
    std::vector<double> per_layer(recall_layer_);
    for (double& r : per_layer) r /= rs;
    s["recall_per_layer"] = per_layer;
    s["kl_mean"] = kl_ / rs;
    s["top1_agreement"] = static_cast<double>(top1_) / rs;
    s["dense_top10_mass"] = top10_ / rs;
    std::vector<nlohmann::json> stale;
    for (int64_t i = 0; i < shape_.tau; ++i)
      stale.push_back(stale_count_[i] ? nlohmann::json(stale_sum_[i] / stale_count_[i]) : nlohmann::json(nullptr));
    s["recall_by_offset"] = stale;  // offset 1 .. tau inside the window
  }
  if (shape_.free_running) s["first_divergence"] = result.first_divergence;
  s["timings_s"] = {{"prefill", result.timings.prefill_s}, {"retriever", result.timings.retriever_s},
                    {"decoder", result.timings.decoder_s},  {"oracle", result.timings.oracle_s},
                    {"measures", result.timings.measures_s}, {"loop_total", result.timings.total_s}};
}

std::string MetricsCollector::summary_text() const {
  const nlohmann::json& s = summary_;
  std::ostringstream out;
  const double keep = s.value("average_keep_ratio", 0.0);
  out << "summary: " << s.value("steps", 0) << " steps, " << s.value("cycles", 0) << " cycles, B "
      << shape_.batch << ", N " << shape_.chunks << ", tau " << shape_.tau << "\n";
  out << "  average keep ratio " << fmt("%.4f", keep) << ", memory not kept " << fmt("%.1f", 100.0 * (1 - keep))
      << "%";
  if (s.value("empty_row_steps", 0) > 0) out << ", empty keep-sets " << s.value("empty_row_steps", 0) << " row-steps";
  out << "\n";
  if (s.value("steps", 0) == 0) return out.str();  // nothing was decoded: no measures
  if (shape_.shadow && s.contains("recall")) {
    out << "  attention-mass recall " << fmt("%.4f", s["recall"].get<double>()) << " (per layer";
    for (const auto& r : s["recall_per_layer"]) out << " " << fmt("%.4f", r.get<double>());
    out << "), KL(dense||sparse) " << fmt("%.4g", s["kl_mean"].get<double>()) << " nats, top-1 agreement "
        << fmt("%.2f", 100.0 * s["top1_agreement"].get<double>()) << "%\n";
    const auto& st = s["recall_by_offset"];
    const auto at = [&](size_t i) { return st[i].is_null() ? std::string("-") : fmt("%.4f", st[i].get<double>()); };
    out << "  staleness: recall at offset 1 " << at(0) << ", " << (st.size() + 1) / 2 << " " << at((st.size() - 1) / 2)
        << ", " << st.size() << " " << at(st.size() - 1) << "\n";
    out << "  dense attention concentration: top 10% of chunks hold " << fmt("%.1f", 100.0 * s["dense_top10_mass"].get<double>())
        << "% of the mass (mean over steps and rows)\n";
  }
  if (s.contains("first_divergence")) {
    out << "  free-running first divergence step per row:";
    for (const auto& v : s["first_divergence"]) out << " " << (v.get<int64_t>() < 0 ? std::string("none") : std::to_string(v.get<int64_t>()));
    out << "\n";
  }
  return out.str();
}

// ---- TraceRecorder ----

void TraceRecorder::on_cycle(const CycleEvent& ev) {
  scores_.insert(scores_.end(), ev.scores.begin(), ev.scores.end());
  keep_.insert(keep_.end(), ev.keep.begin(), ev.keep.end());
}

void TraceRecorder::on_step(const StepEvent& ev) {
  tokens_.insert(tokens_.end(), ev.tokens.begin(), ev.tokens.end());
  hidden_.insert(hidden_.end(), ev.hidden.begin(), ev.hidden.end());
}

void TraceRecorder::on_finish(const LoopResult& result) {
  const int64_t B = shape_.batch, N = shape_.chunks, T = result.steps, C = result.cycles;
  SafetensorsWriter w;
  w.add_u8("compressed_k", {B, N, 132}, keys_);
  w.add_i64("prefill_ids", {B, shape_.prefill}, prompt_);
  w.add_i64("tokens", {T, B}, tokens_);
  w.add_f32("hidden", {T, B, shape_.hidden}, hidden_);
  w.add_f32("cycle_scores", {C, B, N}, scores_);
  w.add_u8("cycle_keep", {C, B, N}, keep_);
  const std::vector<int64_t> config{N, T, shape_.tau, top_k_, B, shape_.heads, shape_.vocab, max_position_};
  w.add_i64("config", {8}, config);
  w.write(path_);
}

// ---- ProgressLine ----

void ProgressLine::on_step(const StepEvent& ev) {
  if (!enabled_) return;
  std::fprintf(stderr, "\rstep %lld/%lld", static_cast<long long>(ev.step + 1), static_cast<long long>(steps_));
  std::fflush(stderr);
}

void ProgressLine::on_finish(const LoopResult&) {
  if (enabled_) std::fprintf(stderr, "\r\033[K");
}

// ---- run folder ----

std::string default_run_dir() {
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  std::string dir = std::string("runs/") + stamp;
  for (int k = 2; std::filesystem::exists(dir); ++k) dir = std::string("runs/") + stamp + "-" + std::to_string(k);
  return dir;
}

void write_run_folder(const std::string& dir, const MetricsCollector& metrics, const std::string& config_yaml) {
  namespace fs = std::filesystem;
  if (fs::exists(dir)) fail("output.dir: ", dir, " already exists (choose a new folder)");
  const fs::path final_path(dir);
  const fs::path temp = final_path.parent_path() / (final_path.filename().string() + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  if (!final_path.parent_path().empty()) fs::create_directories(final_path.parent_path(), ec);
  if (ec) fail("output.dir: cannot create ", final_path.parent_path().string(), ": ", ec.message());
  fs::create_directory(temp, ec);
  if (ec) fail("output.dir: cannot create ", temp.string(), ": ", ec.message());
  try {
    write_file_atomically((temp / "cycles.jsonl").string(), [&](std::ostream& out) {
      for (const auto& c : metrics.cycles()) out << c.dump() << "\n";
    });
    write_file_atomically((temp / "steps.csv").string(), [&](std::ostream& out) { out << metrics.steps_csv(); });
    write_file_atomically((temp / "summary.json").string(),
                          [&](std::ostream& out) { out << metrics.summary().dump(2) << "\n"; });
    write_file_atomically((temp / "config.yaml").string(), [&](std::ostream& out) { out << config_yaml; });
    write_file_atomically((temp / "report.svg").string(), [&](std::ostream& out) {
      out << render_svg_report(make_svg_report(metrics.summary(), metrics.cycles(), metrics.keep_raster(), config_yaml));
    });
    fs::rename(temp, final_path, ec);
    if (ec) fail("output.dir: cannot rename ", temp.string(), " to ", dir, ": ", ec.message());
  } catch (...) {
    fs::remove_all(temp, ec);
    throw;
  }
}

}  // namespace flashmem
