#include "src/loop/svg_report.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <sstream>

namespace flashmem {

// ---- KeepRasterRecorder ----

void KeepRasterRecorder::on_start(const LoopShape& shape) {
  shape_ = shape;
  raster_ = KeepRaster{};
  const int64_t N = shape.chunks;
  raster_.chunks = N;
  raster_.columns = std::min(N, kMaxColumns);
  raster_.batch = shape.batch;
  raster_.rows_shown = std::min(shape.batch, kMaxRows);
  raster_.cycles = shape.steps <= 0 || shape.tau <= 0 ? 0 : (shape.steps + shape.tau - 1) / shape.tau;
  const int64_t drawable = std::max<int64_t>(1, kMaxBands / std::max<int64_t>(raster_.rows_shown, 1));
  raster_.cycle_stride = std::max<int64_t>(1, (raster_.cycles + drawable - 1) / drawable);
  column_of_.resize(N);
  column_size_.assign(raster_.columns, 0);
  for (int64_t n = 0; n < N; ++n) {
    column_of_[n] = n * raster_.columns / N;
    column_size_[column_of_[n]] += 1;
  }
  band0_ = -1;
}

void KeepRasterRecorder::on_cycle(const CycleEvent& ev) {
  const int64_t N = raster_.chunks, C = raster_.columns, R = raster_.rows_shown;
  band0_ = -1;
  if (ev.cycle % raster_.cycle_stride != 0 || static_cast<int64_t>(raster_.bands.size()) + R > kMaxBands) return;
  band0_ = static_cast<int64_t>(raster_.bands.size());
  for (int64_t r = 0; r < R; ++r) {
    KeepRaster::Band band;
    band.cycle = ev.cycle, band.row = r, band.step_begin = ev.step, band.step_end = ev.step + ev.window - 1;
    band.kept_share.assign(C, 0.0);
    band.mass.assign(C, 0.0);
    band.missed.assign(C, 0.0);
    for (int64_t n = 0; n < N; ++n)
      if (ev.keep[r * N + n]) band.kept_share[column_of_[n]] += 1.0, band.kept += 1;
    for (int64_t c = 0; c < C; ++c) band.kept_share[c] /= static_cast<double>(column_size_[c]);
    raster_.bands.push_back(std::move(band));
  }
}

void KeepRasterRecorder::on_step(const StepEvent& ev) {
  if (band0_ < 0) return;
  const int64_t N = raster_.chunks, LH = shape_.layers * shape_.heads;
  for (int64_t r = 0; r < raster_.rows_shown; ++r) {
    KeepRaster::Band& band = raster_.bands[band0_ + r];
    band.steps += 1;
    if (shape_.shadow && static_cast<int64_t>(ev.measures.size()) > r) band.recall_sum += ev.measures[r].recall;
    if (static_cast<int64_t>(ev.dense_attention.size()) < (r + 1) * LH * N ||
        static_cast<int64_t>(ev.keep.size()) < (r + 1) * N)
      continue;
    const float* a = ev.dense_attention.data() + r * LH * N;
    const uint8_t* keep = ev.keep.data() + r * N;
    for (int64_t lh = 0; lh < LH; ++lh)
      for (int64_t n = 0; n < N; ++n) {
        band.mass[column_of_[n]] += a[lh * N + n];
        if (!keep[n]) band.missed[column_of_[n]] += a[lh * N + n];
      }
  }
}

// ---- from the collected metrics ----

namespace {

double number_at(const nlohmann::json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : std::numeric_limits<double>::quiet_NaN();
}

double or_zero(double v) { return std::isfinite(v) ? v : 0.0; }

std::string policy_legend(const std::string& config_yaml) {
  try {
    const YAML::Node root = YAML::Load(config_yaml);
    const YAML::Node p = root["policy"];
    if (!p || !p.IsMap()) return "";
    const auto s = [&](const char* key) { return p[key] ? p[key].as<std::string>() : std::string("?"); };
    const std::string select = s("select");
    std::string out = "policy " + s("kind") + ", select " + select + " " + (select == "topk" ? s("top_k") : s("threshold"));
    out += ", ensemble " + s("ensemble") + ", tail " + s("tail") + ", sink " + s("sink");
    out += s("cap") == "0" ? std::string(", no cap") : ", cap " + s("cap");
    return out;
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

SvgReport make_svg_report(const nlohmann::json& summary, const std::vector<nlohmann::json>& cycles,
                          const KeepRaster& raster, const std::string& config_yaml) {
  SvgReport r;
  r.policy = policy_legend(config_yaml);
  r.chunks = summary.value("chunks", int64_t{0});
  r.batch = summary.value("batch", int64_t{0});
  r.tau = summary.value("tau", int64_t{0});
  r.steps = summary.value("steps", int64_t{0});
  r.cycles = summary.value("cycles", int64_t{0});
  r.shadow = summary.contains("recall");
  r.keep_ratio = or_zero(number_at(summary, "average_keep_ratio"));
  r.recall = or_zero(number_at(summary, "recall"));
  r.kl = or_zero(number_at(summary, "kl_mean"));
  r.top1 = or_zero(number_at(summary, "top1_agreement"));
  r.top10 = or_zero(number_at(summary, "dense_top10_mass"));
  if (const auto it = summary.find("recall_by_offset"); it != summary.end() && it->is_array())
    for (const auto& v : *it) r.recall_by_offset.push_back(v.is_number() ? v.get<double>() : std::nan(""));
  for (const auto& c : cycles)
    r.per_cycle.push_back({or_zero(number_at(c, "kept_fraction")), or_zero(number_at(c, "recall")),
                           or_zero(number_at(c, "top1_agreement")), or_zero(number_at(c, "kl_mean"))});
  r.raster = raster;
  return r;
}

// ---- the SVG ----

namespace {

// Coordinates: 2 decimals, trailing zeros dropped; non-finite as 0 (never "nan" / "inf").
std::string num(double v) {
  if (!std::isfinite(v)) v = 0;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  std::string s(buf);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s == "-0" ? "0" : s;
}

// Labels: printf format, "-" for non-finite.
std::string label(const char* format, double v) {
  if (!std::isfinite(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += ch;
    }
  }
  return out;
}

// A tiny SVG writer: every element on its own line, attributes already formatted.
class Svg {
 public:
  void rect(double x, double y, double w, double h, const std::string& fill, const std::string& extra = "") {
    o_ << "<rect x=\"" << num(x) << "\" y=\"" << num(y) << "\" width=\"" << num(w) << "\" height=\"" << num(h)
       << "\" fill=\"" << fill << '"' << (extra.empty() ? "" : " ") << extra << "/>\n";
  }
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, const std::string& extra = "") {
    o_ << "<line x1=\"" << num(x1) << "\" y1=\"" << num(y1) << "\" x2=\"" << num(x2) << "\" y2=\"" << num(y2)
       << "\" stroke=\"" << stroke << '"' << (extra.empty() ? "" : " ") << extra << "/>\n";
  }
  void text(double x, double y, const std::string& s, const std::string& extra = "") {
    o_ << "<text x=\"" << num(x) << "\" y=\"" << num(y) << '"' << (extra.empty() ? "" : " ") << extra << '>'
       << escape(s) << "</text>\n";
  }
  void circle(double x, double y, double r, const std::string& fill) {
    o_ << "<circle cx=\"" << num(x) << "\" cy=\"" << num(y) << "\" r=\"" << num(r) << "\" fill=\"" << fill << "\"/>\n";
  }
  void polyline(const std::vector<std::pair<double, double>>& pts, const std::string& stroke,
                const std::string& extra = "") {
    if (pts.empty()) return;
    o_ << "<polyline fill=\"none\" stroke=\"" << stroke << '"' << (extra.empty() ? "" : " ") << extra << " points=\"";
    for (size_t i = 0; i < pts.size(); ++i) o_ << (i ? " " : "") << num(pts[i].first) << ',' << num(pts[i].second);
    o_ << "\"/>\n";
  }
  void open(const std::string& tag_and_attrs) { o_ << '<' << tag_and_attrs << ">\n"; }
  void close(const std::string& tag) { o_ << "</" << tag << ">\n"; }
  void title(const std::string& s) { o_ << "<title>" << escape(s) << "</title>\n"; }
  std::string str() const { return o_.str(); }

 private:
  std::ostringstream o_;
};

const char* const kInk = "#212529";
const char* const kGrid = "#dee2e6";
const char* const kKept = "#1b2a4a";
const char* const kNotKept = "#e9ecef";
const char* const kRecall = "#1c7ed6";
const char* const kTop1 = "#2f9e44";
const char* const kKeep = "#adb5bd";
const char* const kKl = "#e8590c";
const char* const kMiss = "#e03131";

// Heat colour of level 1..8: light cream to deep orange.
std::string heat(int level) {
  const double t = level / 8.0;
  const int r = static_cast<int>(std::lround(255 + t * (217 - 255)));
  const int g = static_cast<int>(std::lround(244 + t * (72 - 244)));
  const int b = static_cast<int>(std::lround(230 + t * (15 - 230)));
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", r, g, b);
  return buf;
}

double nice_max(double v) {
  if (!(v > 0) || !std::isfinite(v)) return 1.0;
  const double e = std::pow(10.0, std::floor(std::log10(v)));
  const double f = v / e;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * e;
}

// A chart area: data (x0..x1, y0..y1) mapped onto the pixel box (x, y, w, h).
struct Plot {
  double x, y, w, h, x0, x1, y0, y1;
  double px(double v) const { return x + (x1 > x0 ? (v - x0) / (x1 - x0) : 0.5) * w; }
  double py(double v) const { return y + h - (y1 > y0 ? (std::clamp(v, y0, y1) - y0) / (y1 - y0) : 0.0) * h; }
};

// Frame, horizontal grid with y tick labels, axis labels.
void frame(Svg& s, const Plot& p, const std::string& xlabel, const std::string& ylabel, const char* yfmt,
           int yticks = 4) {
  for (int i = 0; i <= yticks; ++i) {
    const double v = p.y0 + (p.y1 - p.y0) * i / yticks;
    s.line(p.x, p.py(v), p.x + p.w, p.py(v), kGrid);
    s.text(p.x - 5, p.py(v) + 4, label(yfmt, v), "text-anchor=\"end\" font-size=\"10\"");
  }
  s.rect(p.x, p.y, p.w, p.h, "none", std::string("stroke=\"") + kInk + "\" stroke-width=\"0.8\"");
  s.text(p.x + p.w / 2, p.y + p.h + 30, xlabel, "text-anchor=\"middle\" font-size=\"11\"");
  s.text(p.x - 38, p.y + p.h / 2, ylabel,
         "text-anchor=\"middle\" font-size=\"11\" transform=\"rotate(-90 " + num(p.x - 38) + " " + num(p.y + p.h / 2) + ")\"");
}

// Integer x tick labels at about `count` places from first to last.
void x_ticks(Svg& s, const Plot& p, int64_t first, int64_t last, int count) {
  const int64_t span = std::max<int64_t>(last - first, 0);
  const int64_t step = std::max<int64_t>(1, static_cast<int64_t>(nice_max(static_cast<double>(span) / count)));
  for (int64_t v = first; v <= last; v += step) {
    s.line(p.px(v), p.y + p.h, p.px(v), p.y + p.h + 4, kInk);
    s.text(p.px(v), p.y + p.h + 15, std::to_string(v), "text-anchor=\"middle\" font-size=\"10\"");
  }
}

void swatch(Svg& s, double x, double y, const std::string& fill, const std::string& text) {
  s.rect(x, y - 9, 12, 10, fill, "stroke=\"#868e96\" stroke-width=\"0.5\"");
  s.text(x + 16, y, text, "font-size=\"11\"");
}

constexpr double kWidth = 1200, kLeft = 80, kRasterW = 1024;

// Panel 1; returns the y below it.
double keep_raster(Svg& s, const SvgReport& r, double top) {
  const KeepRaster& k = r.raster;
  const int64_t nb = static_cast<int64_t>(k.bands.size());
  s.open("g id=\"keep-raster\"");
  s.text(kLeft, top,
         r.shadow ? "Keep mask per window: dark = kept; orange strip under each band = that window's dense attention mass"
                  : "Keep mask per window: dark = kept",
         "font-size=\"14\" font-weight=\"bold\"");
  swatch(s, kLeft, top + 20, kKept, "kept");
  swatch(s, kLeft + 60, top + 20, kNotKept, "not kept");
  if (r.shadow) {
    s.text(kLeft + 150, top + 20, "dense mass vs. an even spread:", "font-size=\"11\"");
    s.text(kLeft + 348, top + 20, "x1", "text-anchor=\"end\" font-size=\"11\"");
    for (int l = 1; l <= 8; ++l) s.rect(kLeft + 352 + (l - 1) * 10, top + 11, 10, 10, heat(l));
    s.text(kLeft + 436, top + 20, "x128 (log scale)", "font-size=\"11\"");
    s.rect(kLeft + 546, top + 16, 12, 3, kMiss);
    s.text(kLeft + 562, top + 20, "missed: a column holding >= 4x an even share, mostly not kept", "font-size=\"11\"");
  }
  double y = top + 40;
  if (nb == 0 || k.columns == 0) {
    s.text(kLeft, y + 16, "no windows: nothing was decoded", "font-size=\"12\" fill=\"#868e96\"");
    s.close("g");
    return y + 40;
  }
  const double cw = kRasterW / static_cast<double>(k.columns);
  const double bh = std::clamp(240.0 / static_cast<double>(nb), 7.0, 22.0);
  const double hh = r.shadow ? std::max(3.0, std::round(bh * 0.45)) : 0.0, pitch = bh + hh + 6;
  const int64_t label_every = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(11.0 / pitch)));
  const bool show_recall = r.shadow && r.steps > 0;
  if (show_recall) s.text(kLeft + kRasterW + 8, y - 5, "recall", "font-size=\"10\" fill=\"#495057\"");
  for (int64_t i = 0; i < nb; ++i) {
    const KeepRaster::Band& b = k.bands[i];
    const double recall = b.steps ? b.recall_sum / static_cast<double>(b.steps) : std::nan("");
    s.open("g class=\"band\"");
    s.title("window " + std::to_string(b.cycle) + " (steps " + std::to_string(b.step_begin) + ".." +
            std::to_string(b.step_end) + "), row " + std::to_string(b.row) + ": kept " + std::to_string(b.kept) + " of " +
            std::to_string(k.chunks) + (show_recall ? ", recall " + label("%.3f", recall) : ""));
    s.rect(kLeft, y, kRasterW, bh, kNotKept);
    // Kept columns, runs of equal shade merged; data-n = columns in the run.
    for (int64_t c = 0; c < k.columns;) {
      const int level = static_cast<int>(std::lround(std::clamp(b.kept_share[c], 0.0, 1.0) * 8));
      const int shade = b.kept_share[c] > 0 ? std::max(level, 1) : 0;
      int64_t e = c + 1;
      while (e < k.columns && (b.kept_share[e] > 0 ? std::max<int>(std::lround(std::clamp(b.kept_share[e], 0.0, 1.0) * 8), 1) : 0) == shade) ++e;
      if (shade > 0)
        s.rect(kLeft + c * cw, y, (e - c) * cw, bh, kKept,
               "class=\"k\" data-n=\"" + std::to_string(e - c) + "\"" +
                   (shade < 8 ? " fill-opacity=\"" + num(shade / 8.0) + "\"" : ""));
      c = e;
    }
    // Heat strip: level 1 + log2(mass / mean column mass), 1 .. 8 (x1 .. x128 an even share), runs merged.
    const double mean = std::accumulate(b.mass.begin(), b.mass.end(), 0.0) / static_cast<double>(k.columns);
    if (mean > 0) {
      const auto lvl = [&](int64_t c) {
        const double ratio = b.mass[c] / mean;
        return ratio < 1 ? 0 : std::min(8, 1 + static_cast<int>(std::floor(std::log2(ratio))));
      };
      for (int64_t c = 0; c < k.columns;) {
        const int level = lvl(c);
        int64_t e = c + 1;
        while (e < k.columns && lvl(e) == level) ++e;
        if (level > 0) s.rect(kLeft + c * cw, y + bh, (e - c) * cw, hh, heat(level), "class=\"m\"");
        c = e;
      }
      // Missed heavy columns: a red tick under the strip (at least 2 px wide to stay visible).
      for (int64_t c = 0; c < k.columns; ++c)
        if (lvl(c) >= 3 && b.missed[c] >= 0.5 * b.mass[c])
          s.rect(kLeft + c * cw, y + bh + hh, std::max(cw, 2.0), 3, kMiss, "class=\"miss\"");
    }
    if (i % label_every == 0) {
      const std::string name = "w" + std::to_string(b.cycle) + (k.batch > 1 ? " b" + std::to_string(b.row) : "");
      s.text(kLeft - 6, y + bh - 1, name, "text-anchor=\"end\" font-size=\"10\"");
      if (show_recall) s.text(kLeft + kRasterW + 8, y + bh - 1, label("%.3f", recall), "font-size=\"10\"");
    }
    s.close("g");
    y += pitch + (k.rows_shown > 1 && b.row == k.rows_shown - 1 ? 6 : 0);  // gap between windows
  }
  // x axis: chunk index (age).
  const double N = static_cast<double>(k.chunks);
  for (int q = 0; q <= 4; ++q) {
    const int64_t n = q == 4 ? k.chunks - 1 : static_cast<int64_t>(N * q / 4);
    const double x = kLeft + (n + 0.5) * kRasterW / N;
    s.line(x, y, x, y + 4, kInk);
    s.text(x, y + 15, std::to_string(n), "text-anchor=\"middle\" font-size=\"10\"");
  }
  std::string axis = "chunk index (0 = oldest .. " + std::to_string(k.chunks - 1) + " = newest)";
  if (k.columns < k.chunks) {
    const int64_t per = (k.chunks + k.columns - 1) / k.columns;
    axis += "; binned: 1 column = " + std::string(k.chunks % k.columns ? "up to " : "") + std::to_string(per) +
            " chunks, shade = kept share" + (r.shadow ? ", mass summed" : "");
  }
  s.text(kLeft + kRasterW / 2, y + 30, axis, "text-anchor=\"middle\" font-size=\"11\"");
  s.text(kLeft - 6, top + 35, k.batch > 1 ? "window, row" : "window", "text-anchor=\"end\" font-size=\"10\" fill=\"#495057\"");
  std::string note;
  if (k.rows_shown < k.batch) note += "rows 0-" + std::to_string(k.rows_shown - 1) + " of " + std::to_string(k.batch) + " shown";
  if (k.cycle_stride > 1 || nb < k.cycles * k.rows_shown)
    note += std::string(note.empty() ? "" : "; ") + "one window in " + std::to_string(k.cycle_stride) + " shown (" +
            std::to_string(nb / std::max<int64_t>(k.rows_shown, 1)) + " of " + std::to_string(k.cycles) + ")";
  if (!note.empty()) s.text(kLeft, y + 46, note, "font-size=\"11\" fill=\"#868e96\"");
  s.close("g");
  return y + (note.empty() ? 44 : 58);
}

void staleness(Svg& s, const SvgReport& r, double top) {
  s.open("g id=\"staleness\"");
  s.text(kLeft - 40, top, "Staleness: recall by step offset inside the window", "font-size=\"14\" font-weight=\"bold\"");
  const int64_t tau = static_cast<int64_t>(r.recall_by_offset.size());
  std::vector<std::pair<double, double>> pts;
  double lo = 1, hi = 0;
  for (double v : r.recall_by_offset)
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!r.shadow || tau == 0 || lo > hi) {
    s.text(kLeft, top + 40, r.shadow ? "no steps decoded: nothing measured" : "no dense shadow: recall not measured",
           "font-size=\"12\" fill=\"#868e96\"");
    s.close("g");
    return;
  }
  // y range: the data's, widened to whole ticks of 0.005 .. 0.2 (the finest giving <= 5 of them).
  double tick = 0.2;
  for (double t : {0.005, 0.01, 0.02, 0.05, 0.1})
    if (std::ceil((hi + 1e-9) / t) - std::floor((lo - 1e-9) / t) <= 5) { tick = t; break; }
  lo = std::max(0.0, std::floor((lo - 1e-9) / tick) * tick);
  hi = std::min(1.0, std::ceil((hi + 1e-9) / tick) * tick);
  while (hi - lo < 3.5 * tick && (lo > 0 || hi < 1)) {  // at least 4 ticks: widen both ways
    if (lo > 0) lo = std::max(0.0, lo - tick);
    if (hi < 1 && hi - lo < 3.5 * tick) hi = std::min(1.0, hi + tick);
  }
  const int yticks = static_cast<int>(std::lround((hi - lo) / tick));
  const Plot p{kLeft, top + 26, 460, 190, tau > 1 ? 1.0 : 0.5, tau > 1 ? static_cast<double>(tau) : 1.5, lo, hi};
  frame(s, p, "offset inside the window (1 = first step after the keep-set was chosen .. tau = " + std::to_string(tau) + ")",
        "attention-mass recall", tick < 0.01 ? "%.3f" : "%.2f", yticks);
  x_ticks(s, p, 1, tau, 8);
  s.line(p.x, p.py(r.recall), p.x + p.w, p.py(r.recall), kRecall, "stroke-dasharray=\"4 3\" stroke-width=\"0.8\"");
  s.line(p.x + p.w - 130, p.y - 8, p.x + p.w - 112, p.y - 8, kRecall, "stroke-dasharray=\"4 3\" stroke-width=\"0.8\"");
  s.text(p.x + p.w - 108, p.y - 4, "run mean " + label("%.3f", r.recall), "font-size=\"10\"");
  for (int64_t i = 0; i < tau; ++i)
    if (std::isfinite(r.recall_by_offset[i])) pts.emplace_back(p.px(i + 1.0), p.py(r.recall_by_offset[i]));
  s.polyline(pts, kRecall, "class=\"stale\" stroke-width=\"1.6\"");
  if (tau <= 64)
    for (const auto& [x, y] : pts) s.circle(x, y, 2, kRecall);
  s.close("g");
}

void per_cycle(Svg& s, const SvgReport& r, double top) {
  const double left = 680, w = 460;
  const int64_t C = static_cast<int64_t>(r.per_cycle.size());
  s.open("g id=\"per-window\"");
  s.text(left - 40, top, "Per window", "font-size=\"14\" font-weight=\"bold\"");
  if (C == 0) {
    s.text(left, top + 40, "no windows: nothing was decoded", "font-size=\"12\" fill=\"#868e96\"");
    s.close("g");
    return;
  }
  swatch(s, left + 80, top, kKeep, "keep ratio");
  if (r.shadow) {
    swatch(s, left + 170, top, kRecall, "recall");
    swatch(s, left + 240, top, kTop1, "top-1 agreement");
  }
  const double slot = w / static_cast<double>(C);
  const Plot p{left, top + 16, w, 110, -0.5, C - 0.5, 0, 1};
  frame(s, p, "", "share", "%.2f", 2);
  for (int64_t c = 0; c < C; ++c)
    s.rect(p.px(c) - slot * 0.3, p.py(r.per_cycle[c].keep_ratio), slot * 0.6,
           p.py(0) - p.py(r.per_cycle[c].keep_ratio), kKeep);
  if (r.shadow) {
    std::vector<std::pair<double, double>> rec, top1;
    for (int64_t c = 0; c < C; ++c) {
      rec.emplace_back(p.px(c), p.py(r.per_cycle[c].recall));
      top1.emplace_back(p.px(c), p.py(r.per_cycle[c].top1));
    }
    s.polyline(top1, kTop1, "stroke-width=\"1.4\"");
    s.polyline(rec, kRecall, "stroke-width=\"1.4\"");
    if (C <= 48)
      for (int64_t c = 0; c < C; ++c) s.circle(rec[c].first, rec[c].second, 2.2, kRecall), s.circle(top1[c].first, top1[c].second, 2.2, kTop1);
  }
  x_ticks(s, p, 0, C - 1, 8);
  // KL panel.
  s.text(left - 40, p.y + p.h + 36, "KL(dense || sparse), mean over the window's steps", "font-size=\"12\" font-weight=\"bold\"");
  if (!r.shadow) {
    s.text(left, p.y + p.h + 60, "no dense shadow: KL not measured", "font-size=\"12\" fill=\"#868e96\"");
    s.close("g");
    return;
  }
  double kmax = 0;
  for (const auto& c : r.per_cycle) kmax = std::max(kmax, c.kl);
  const Plot q{left, p.y + p.h + 46, w, 70, -0.5, C - 0.5, 0, nice_max(kmax)};
  frame(s, q, "window (tau = " + std::to_string(r.tau) + " steps each)", "nats", "%.3g", 2);
  for (int64_t c = 0; c < C; ++c)
    s.rect(q.px(c) - slot * 0.3, q.py(r.per_cycle[c].kl), slot * 0.6, q.py(0) - q.py(r.per_cycle[c].kl), kKl);
  x_ticks(s, q, 0, C - 1, 8);
  s.close("g");
}

}  // namespace

std::string render_svg_report(const SvgReport& r) {
  Svg body;
  body.text(kLeft - 40, 28, "flashmem run: keep masks, recall and staleness", "font-size=\"18\" font-weight=\"bold\"");
  body.text(kLeft - 40, 48,
            (r.policy.empty() ? std::string("policy ?") : r.policy) + "   |   N " + std::to_string(r.chunks) + " chunks, B " +
                std::to_string(r.batch) + ", tau " + std::to_string(r.tau) + ", " + std::to_string(r.steps) + " steps, " +
                std::to_string(r.cycles) + " windows",
            "font-size=\"12\"");
  std::string numbers = "keep ratio " + label("%.4f", r.keep_ratio) + " (" + label("%.1f", 100 * (1 - r.keep_ratio)) +
                        "% of memory not kept)";
  if (r.steps == 0)
    numbers = "no steps decoded: nothing measured";
  else if (r.shadow)
    numbers += "   |   recall " + label("%.4f", r.recall) + "   |   KL " + label("%.4g", r.kl) + " nats   |   top-1 " +
               label("%.1f", 100 * r.top1) + "%   |   dense: top 10% of chunks hold " + label("%.1f", 100 * r.top10) +
               "% of mass";
  else
    numbers += "   |   no dense shadow: recall, KL, top-1 not measured";
  body.text(kLeft - 40, 66, numbers, "font-size=\"12\"");
  const double below = keep_raster(body, r, 100);
  staleness(body, r, below + 10);
  per_cycle(body, r, below + 10);
  const double height = below + 10 + 290;

  std::ostringstream out;
  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << num(kWidth) << "\" height=\"" << num(height)
      << "\" viewBox=\"0 0 " << num(kWidth) << ' ' << num(height) << "\" font-family=\"Helvetica, Arial, sans-serif\" fill=\""
      << kInk << "\">\n"
      << "<rect x=\"0\" y=\"0\" width=\"" << num(kWidth) << "\" height=\"" << num(height) << "\" fill=\"#ffffff\"/>\n"
      << body.str() << "</svg>\n";
  return out.str();
}

}  // namespace flashmem
