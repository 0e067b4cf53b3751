// Bad input to the retriever, one case each: every error is a flashmem::Error whose single
// line names the file, key or field and says what was expected.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>

#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "src/retriever/retriever.hpp"
#include "src/retriever/score_inputs.hpp"
#include "src/retriever/synthetic.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;

namespace {

// The message of the Error thrown by f ("" if none); also checks it is one line.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    const std::string what = e.what();
    CHECK_MESSAGE(what.find('\n') == std::string::npos, "multi-line error: ", what);
    return what;
  }
  return "";
}

bool has(const std::string& text, const std::string& part) {
  const bool ok = text.find(part) != std::string::npos;
  if (!ok) MESSAGE("'", text, "' lacks '", part, "'");
  return ok;
}

// A small checkpoint written from the fixture, with `edit` applied to its tensor list.
std::string edited_checkpoint(const std::string& name, const std::function<void(SafetensorsWriter&, const SafetensorsFile&)>& edit) {
  const auto src = SafetensorsFile::open(testing::fixture("retriever_small.safetensors"));
  SafetensorsWriter w;
  edit(w, src);
  const std::string path = testing::scratch(name);
  w.write(path);
  return path;
}

void copy_all_but(SafetensorsWriter& w, const SafetensorsFile& src, const std::string& skip) {
  for (const auto& n : src.names())
    if (n != skip) w.add(n, src.tensor(n).dtype, src.tensor(n).shape, src.tensor(n).bytes);
}

struct Small {
  std::shared_ptr<RetrieverWeights> weights =
      std::make_shared<RetrieverWeights>(load_retriever(testing::fixture("retriever_small.safetensors")));
  OwnedScoreInputs in = mock_score_inputs(2, 5, 128, 7);
  std::unique_ptr<Retriever> retriever = make_retriever(Device::Cpu, weights);
};

}  // namespace

TEST_CASE("checkpoint without retrievers. keys") {
  const std::string path = edited_checkpoint("nokeys.safetensors", [](SafetensorsWriter& w, const SafetensorsFile&) {
    const std::vector<float> x = {1.0f};
    w.add_f32("model.layers.0.weight", {1}, x);
  });
  const std::string e = error_of([&] { load_retriever(path); });
  CHECK(has(e, path));
  CHECK(has(e, "no 'retrievers.<layer>.*' keys"));
}

TEST_CASE("missing weight") {
  const std::string path = edited_checkpoint("missing.safetensors", [](SafetensorsWriter& w, const SafetensorsFile& src) {
    copy_all_but(w, src, "retrievers.l12.wq_b.weight");
  });
  CHECK(has(error_of([&] { load_retriever(path); }), "missing weight 'retrievers.l12.wq_b.weight'"));
}

TEST_CASE("unknown layer name") {
  const std::string e = error_of([] { load_retriever(testing::fixture("retriever_small.safetensors"), {"l10", "l99"}); });
  CHECK(has(e, "unknown layer 'l99'"));
  CHECK(has(e, "l10, l12, l20"));
}

TEST_CASE("inconsistent shapes across weights") {
  const std::string path = edited_checkpoint("shapes.safetensors", [](SafetensorsWriter& w, const SafetensorsFile& src) {
    copy_all_but(w, src, "retrievers.l20.q_norm_weight");
    const std::vector<float> wrong(63, 1.0f);
    w.add_f32("retrievers.l20.q_norm_weight", {63}, wrong);
  });
  const std::string e = error_of([&] { load_retriever(path); });
  CHECK(has(e, "retrievers.l20.q_norm_weight"));
  CHECK(has(e, "expected [64]"));
}

TEST_CASE("compressed_k with a last dimension other than 132") {
  SafetensorsWriter w;
  const std::vector<float> hidden(128, 0.5f);
  const std::vector<uint8_t> keys(3 * 128, 0);
  const std::vector<int64_t> pos = {4};
  w.add_f32("hidden", {1, 128}, hidden);
  w.add_u8("compressed_k", {1, 3, 128}, keys);
  w.add_i64("positions", {1}, pos);
  const std::string path = testing::scratch("keys128.safetensors");
  w.write(path);
  const std::string e = error_of([&] { load_score_inputs(path, 128); });
  CHECK(has(e, path));
  CHECK(has(e, "'compressed_k'"));
  CHECK(has(e, "expected [*, *, 132]"));
}

TEST_CASE("NaN or Inf in a scale names the row and chunk") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Small s;
    std::memcpy(s.in.keys.data() + (1 * 5 + 3) * kChunkBytes + kKeyDim, &bad, 4);
    const std::string e = error_of([&] { s.retriever->score(s.in.view()); });
    CHECK(has(e, "compressed_k: scale of batch row 1 chunk 3"));
  }
}

TEST_CASE("NaN fp8 bytes in keys name the row and chunk") {
  Small s;
  s.in.keys[(0 * 5 + 4) * kChunkBytes + 17] = 0xFF;
  const std::string e = error_of([&] { s.retriever->score(s.in.view()); });
  CHECK(has(e, "batch row 0 chunk 4 value 17 is an fp8 NaN byte"));
}

TEST_CASE("N = 0") {
  Small s;
  ScoreInputs v = s.in.view();
  v.keys.chunks = 0;
  CHECK(has(error_of([&] { s.retriever->score(v); }), "compressed_k: N = 0 chunks"));
  CHECK(has(error_of([] { mock_score_inputs(1, 0, 128, 1); }), "--n-chunks"));
}

TEST_CASE("B = 0") {
  Small s;
  const ScoreInputs v{{}, CompressedKeysView{s.in.keys.data(), 0, 5}, {}};
  CHECK(has(error_of([&] { s.retriever->score(v); }), "positions: batch size B = 0"));
}

TEST_CASE("negative positions") {
  Small s;
  s.in.positions[1] = -3;
  CHECK(has(error_of([&] { s.retriever->score(s.in.view()); }), "positions: row 1 is -3, expected >= 0"));
}

TEST_CASE("hidden of the wrong size or not finite") {
  Small s;
  s.in.hidden.pop_back();
  CHECK(has(error_of([&] { s.retriever->score(s.in.view()); }), "expected [B = 2, D = 128]"));
  s.in.hidden.push_back(NAN);
  CHECK(has(error_of([&] { s.retriever->score(s.in.view()); }), "hidden: row 1 value 127 is not finite"));
}

TEST_CASE("top-k <= 0") {
  Small s;
  for (int64_t k : {0, -5})
    CHECK(has(error_of([&] { s.retriever->retrieve(s.in.view(), SelectRule::top_k_rule(k)); }), "top_k: "));
}

TEST_CASE("threshold outside [0, 1]") {
  Small s;
  for (float t : {-0.1f, 1.5f, NAN})
    CHECK(has(error_of([&] { s.retriever->retrieve(s.in.view(), SelectRule::threshold_rule(t)); }), "outside [0, 1]"));
}

TEST_CASE("max_position <= 0") {
  RetrieverOptions o;
  o.max_position = 0;
  CHECK(has(error_of([&] { o.validate(); }), "max_position"));
}

TEST_CASE("selection semantics: strict threshold and ties to the lower index") {
  const std::vector<float> scores = {0.5f, 0.7f, 0.7f, 0.2f, 0.7f, 0.50001f};
  const Selection thr = select_chunks(scores, 1, 6, SelectRule::threshold_rule(0.5f));
  CHECK(thr.keep == std::vector<uint8_t>{0, 1, 1, 0, 1, 1});
  const Selection top = select_chunks(scores, 1, 6, SelectRule::top_k_rule(2));
  CHECK(top.top_indices == std::vector<int64_t>{1, 2});
  const Selection all = select_chunks(scores, 1, 6, SelectRule::top_k_rule(100));
  CHECK(all.kept_count[0] == 6);
  CHECK(all.top_indices == std::vector<int64_t>{1, 2, 4, 5, 0, 3});
}
