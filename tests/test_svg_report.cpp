// report.svg: well-formed XML, the three panels, the keep raster counts exactly the kept
// chunks of a hand-made input, the staleness line has tau points, no NaN/inf text ever, and
// the run folder of a real (fixture) loop holds it.
#include <doctest/doctest.h>

#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "src/loop/config.hpp"
#include "src/loop/loop.hpp"
#include "src/loop/report.hpp"
#include "src/loop/setup.hpp"
#include "src/loop/svg_report.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;
using flashmem::testing::fixture;
using flashmem::testing::scratch;

namespace {

// A small XML checker: one root element, balanced and properly nested tags, quoted attributes,
// no raw '<' in text and only the five predefined entities. Returns "" or what is wrong.
std::string xml_error(const std::string& s) {
  std::vector<std::string> open;
  size_t i = 0, roots = 0;
  const auto name_at = [&](size_t& j) {
    const size_t b = j;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '-' || s[j] == '_' || s[j] == ':')) ++j;
    return s.substr(b, j - b);
  };
  if (s.rfind("<?xml", 0) == 0) i = s.find("?>") + 2;
  while (i < s.size()) {
    if (s[i] == '&') {
      const size_t e = s.find(';', i);
      const std::string ent = e == std::string::npos ? "" : s.substr(i, e - i + 1);
      if (ent != "&amp;" && ent != "&lt;" && ent != "&gt;" && ent != "&quot;" && ent != "&apos;")
        return "bad entity at " + std::to_string(i);
      i = e + 1;
      continue;
    }
    if (s[i] != '<') {
      if (open.empty() && !std::isspace(static_cast<unsigned char>(s[i]))) return "text outside the root";
      ++i;
      continue;
    }
    ++i;
    if (s[i] == '/') {
      ++i;
      const std::string name = name_at(i);
      if (open.empty() || open.back() != name) return "unbalanced </" + name + "> at " + std::to_string(i);
      open.pop_back();
      if (s[i] != '>') return "bad end tag at " + std::to_string(i);
      ++i;
      continue;
    }
    const std::string name = name_at(i);
    if (name.empty()) return "bad tag at " + std::to_string(i);
    if (open.empty() && ++roots > 1) return "more than one root";
    for (;;) {  // attributes
      while (std::isspace(static_cast<unsigned char>(s[i]))) ++i;
      if (s[i] == '>') {
        open.push_back(name), ++i;
        break;
      }
      if (s.compare(i, 2, "/>") == 0) {
        i += 2;
        break;
      }
      const std::string attr = name_at(i);
      if (attr.empty() || s[i] != '=' || s[i + 1] != '"') return "bad attribute in <" + name + "> at " + std::to_string(i);
      const size_t e = s.find('"', i + 2);
      if (e == std::string::npos || s.substr(i + 2, e - i - 2).find('<') != std::string::npos)
        return "bad attribute value at " + std::to_string(i);
      i = e + 1;
    }
  }
  if (!open.empty()) return "unclosed <" + open.back() + ">";
  return roots == 1 ? "" : "no root";
}

// "nan" or "inf" as a word (case-insensitive): what printf writes for non-finite values.
bool has_non_finite_text(const std::string& s) {
  std::string low(s);
  for (char& c : low) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* w : {"nan", "inf"})
    for (size_t p = low.find(w); p != std::string::npos; p = low.find(w, p + 1)) {
      const bool before = p > 0 && std::isalpha(static_cast<unsigned char>(low[p - 1]));
      const bool after = p + 3 < low.size() && std::isalpha(static_cast<unsigned char>(low[p + 3]));
      if (!before && !after) return true;
    }
  return false;
}

int64_t count(const std::string& s, const std::string& what) {
  int64_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// Sum of data-n over the kept cells (runs of kept columns are merged into one rect).
int64_t dark_cells(const std::string& svg) {
  int64_t n = 0;
  for (size_t p = svg.find("class=\"k\" data-n=\""); p != std::string::npos; p = svg.find("class=\"k\" data-n=\"", p + 1))
    n += std::stoll(svg.substr(p + 18));
  return n;
}

// Points of the staleness polyline.
int64_t staleness_points(const std::string& svg) {
  const size_t p = svg.find("class=\"stale\"");
  if (p == std::string::npos) return 0;
  const size_t b = svg.find("points=\"", p) + 8, e = svg.find('"', b);
  std::istringstream in(svg.substr(b, e - b));
  std::string pt;
  int64_t n = 0;
  while (in >> pt) n += 1;
  return n;
}

// A hand-made run: B rows, N chunks, steps, tau, fed straight into the recorder.
struct HandRun {
  HandRun(int64_t b, int64_t n, int64_t s, int64_t t) : B(b), N(n), steps(s), tau(t) {}
  int64_t B, N, steps, tau, L = 1, H = 2;
  std::vector<std::vector<uint8_t>> keeps;  // per cycle [B, N]
  KeepRasterRecorder rec;
  SvgReport report;

  void run() {
    LoopShape shape;
    shape.batch = B, shape.chunks = N, shape.layers = L, shape.heads = H, shape.steps = steps, shape.tau = tau;
    shape.shadow = true;
    rec.on_start(shape);
    std::vector<float> scores(B * N, 0.5f), attention(B * L * H * N);
    for (size_t i = 0; i < attention.size(); ++i) attention[i] = (i % N == 3) ? 0.5f : 0.5f / static_cast<float>(N - 1);
    std::vector<int64_t> q(B, 0);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t c = t / tau;
      const std::vector<uint8_t>& keep = keeps[c];
      if (t % tau == 0) rec.on_cycle({c, t, std::min(tau, steps - t), q, scores, keep, keep});
      std::vector<RowMeasures> m(B);
      for (auto& r : m) r.recall = 0.75, r.recall_per_layer = {0.75};
      StepEvent ev;
      ev.step = t, ev.cycle = c, ev.offset = t % tau + 1, ev.keep = keep, ev.dense_attention = attention, ev.measures = m;
      rec.on_step(ev);
    }
    report.chunks = N, report.batch = B, report.tau = tau, report.steps = steps, report.cycles = (steps + tau - 1) / tau;
    report.shadow = true, report.policy = "policy hand-made <&>";
    report.recall_by_offset.assign(tau, 0.75);
    for (int64_t i = 0; i < tau; ++i) report.recall_by_offset[i] = 0.8 - 0.01 * i;
    report.per_cycle.assign(report.cycles, {0.3, 0.75, 1.0, 0.01});
    report.raster = rec.raster();
  }
};

}  // namespace

TEST_CASE("svg report: well-formed, three panels, dark cells = kept chunks, tau staleness points") {
  HandRun h{2, 10, 7, 3};
  h.keeps = {
      {1, 1, 0, 0, 1, 0, 1, 1, 1, 0, /* row 1 */ 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
      {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* row 1 */ 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
      {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, /* row 1 */ 0, 1, 0, 1, 0, 1, 0, 1, 0, 1},
  };
  h.run();
  int64_t kept = 0;
  for (const auto& k : h.keeps)
    for (uint8_t v : k) kept += v;
  const std::string svg = render_svg_report(h.report);
  CHECK(xml_error(svg) == "");
  for (const char* id : {"id=\"keep-raster\"", "id=\"staleness\"", "id=\"per-window\""}) CHECK(count(svg, id) == 1);
  CHECK(count(svg, "class=\"band\"") == 6);  // 3 windows x 2 rows
  CHECK(dark_cells(svg) == kept);
  CHECK(staleness_points(svg) == 3);
  CHECK(svg.find("policy hand-made &lt;&amp;&gt;") != std::string::npos);
  CHECK(svg.find("binned") == std::string::npos);  // N <= 1024: one column per chunk
  // Chunk 3 holds half the mass and is never kept in row 0: marked missed in every row-0 band.
  CHECK(count(svg, "class=\"miss\"") >= 3);
  CHECK_FALSE(has_non_finite_text(svg));
  // The recorder: kept counts, mass per window = steps x layers x heads (softmax rows sum to 1).
  const KeepRaster& r = h.rec.raster();
  REQUIRE(r.bands.size() == 6);
  CHECK(r.bands[0].kept == 6);
  CHECK(r.bands[3].kept == 10);
  double mass = 0;
  for (double m : r.bands[0].mass) mass += m;
  CHECK(mass == doctest::Approx(3 * 1 * 2));  // window 0: 3 steps x 1 layer x 2 heads
  mass = 0;
  for (double m : r.bands[4].mass) mass += m;
  CHECK(mass == doctest::Approx(1 * 1 * 2));  // window 2 is step 6 only
}

TEST_CASE("svg report: large N is binned into at most 1024 columns, shade = kept share") {
  HandRun h{1, 4096, 4, 4};
  std::vector<uint8_t> keep(4096, 0);
  for (int64_t n = 0; n < 4096; n += 2) keep[n] = 1;  // every other chunk: share 0.5 everywhere
  h.keeps = {keep};
  h.run();
  REQUIRE(h.rec.raster().columns == 1024);
  const std::string svg = render_svg_report(h.report);
  CHECK(xml_error(svg) == "");
  CHECK(svg.find("1 column = 4 chunks") != std::string::npos);
  CHECK(count(svg, "class=\"k\"") == 1);  // one merged run, half shaded
  CHECK(svg.find("data-n=\"1024\" fill-opacity=\"0.5\"") != std::string::npos);
}

TEST_CASE("svg report: many windows and rows are capped; empty keep-sets and zero steps give no NaN") {
  HandRun many{12, 64, 400, 2};
  many.keeps.assign(200, std::vector<uint8_t>(12 * 64, 0));  // every keep-set empty
  many.run();
  const KeepRaster& r = many.rec.raster();
  CHECK(r.rows_shown == KeepRasterRecorder::kMaxRows);
  CHECK(static_cast<int64_t>(r.bands.size()) <= KeepRasterRecorder::kMaxBands);
  many.report.recall_by_offset[1] = std::nan("");  // an offset with no step
  many.report.per_cycle[0].kl = std::nan("");
  std::string svg = render_svg_report(many.report);
  CHECK(xml_error(svg) == "");
  CHECK(dark_cells(svg) == 0);
  CHECK(svg.find("rows 0-7 of 12 shown") != std::string::npos);
  CHECK_FALSE(has_non_finite_text(svg));

  // Nothing decoded: summary and cycles as the collector writes them for steps = 0.
  KeepRasterRecorder rec;
  LoopShape shape;
  shape.batch = 1, shape.chunks = 8, shape.tau = 4, shape.shadow = true;
  rec.on_start(shape);
  const nlohmann::json summary = {{"steps", 0},  {"cycles", 0}, {"batch", 1},   {"chunks", 8},
                                  {"tau", 4},    {"recall", 0.0}, {"kl_mean", 0.0}, {"average_keep_ratio", 0.0},
                                  {"recall_by_offset", {nullptr, nullptr, nullptr, nullptr}}};
  svg = render_svg_report(make_svg_report(summary, {}, rec.raster(), "not: [valid yaml"));
  CHECK(xml_error(svg) == "");
  for (const char* id : {"id=\"keep-raster\"", "id=\"staleness\"", "id=\"per-window\""}) CHECK(count(svg, id) == 1);
  CHECK(staleness_points(svg) == 0);
  CHECK_FALSE(has_non_finite_text(svg));
  svg = render_svg_report(SvgReport{});  // all defaults
  CHECK(xml_error(svg) == "");
  CHECK_FALSE(has_non_finite_text(svg));
}

TEST_CASE("svg report: the run folder of a fixture loop holds report.svg") {
  namespace fs = std::filesystem;
  RunConfig cfg;
  cfg.device = "cpu";
  cfg.model.weights = fixture("toy_decoder_small.safetensors");
  cfg.retriever.checkpoint = fixture("retriever_small.safetensors");
  cfg.retriever.max_position = 4096;
  cfg.loop.batch = 2, cfg.loop.steps = 20, cfg.loop.tau = 8;
  cfg.policy.select = "topk", cfg.policy.top_k = 20, cfg.policy.tail = 4, cfg.policy.sink = 2, cfg.policy.cap = 0;
  RunSetup setup = prepare_run(cfg);
  auto decoder = make_decoder(Device::Cpu, setup.decoder_weights);
  auto retriever = make_retriever(Device::Cpu, setup.retriever_weights, retriever_options(cfg));
  auto policy = make_keep_policy(cfg.policy.kind);
  MetricsCollector metrics;
  StepObserver* obs[] = {&metrics};
  run_decode_loop(loop_settings(cfg), {decoder.get(), retriever.get(), setup.keys_view(), setup.prompt}, *policy, obs);
  const std::string dir = scratch("svg_report_run");
  fs::remove_all(dir);
  write_run_folder(dir, metrics, to_yaml(cfg));
  std::ifstream in(dir + "/report.svg");
  std::stringstream text;
  text << in.rdbuf();
  const std::string svg = text.str();
  CHECK(xml_error(svg) == "");
  CHECK(svg.find("policy retriever, select topk 20, ensemble max, tail 4, sink 2, no cap") != std::string::npos);
  CHECK(staleness_points(svg) == 8);
  CHECK(count(svg, "class=\"band\"") == 6);  // 3 windows x 2 rows
  int64_t kept = 0;
  for (const auto& c : metrics.cycles())
    for (const auto& k : c["kept"]) kept += k.get<int64_t>();
  CHECK(dark_cells(svg) == kept);  // N = 97 <= 1024: one column per chunk
  CHECK_FALSE(has_non_finite_text(svg));
  fs::remove_all(dir);
}
