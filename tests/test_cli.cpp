// The `flashmem` program end to end: the score command on the reference's real-size inputs
// (its output compared with the reference's tensors), make-checkpoint, and one-line errors
// with a non-zero exit and no partial output.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "src/formats/safetensors.hpp"
#include "src/retriever/synthetic.hpp"
#include "src/retriever/weights.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;

namespace {

struct Result {
  int code;
  std::string out, err;
};

// Runs `flashmem <args>` (the binary meson passes in FLASHMEM_BIN), capturing both streams.
Result run_flashmem(const std::string& args) {
  const char* bin = std::getenv("FLASHMEM_BIN");
  REQUIRE_MESSAGE(bin != nullptr, "FLASHMEM_BIN is not set (run through meson test)");
  const std::string out = testing::scratch("cli.out"), err = testing::scratch("cli.err");
  const int status = std::system((std::string(bin) + " " + args + " >" + out + " 2>" + err).c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  };
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

}  // namespace

TEST_CASE("score --inputs on realdim_public reproduces the reference's masks and logits") {
  const std::string out = testing::scratch("realdim_scores.safetensors");
  std::filesystem::remove(out);
  const Result r = run_flashmem("score --device cpu --top-k 64 --inputs " + testing::fixture("realdim_public.safetensors") +
                            " --out " + out);
  REQUIRE_MESSAGE(r.code == 0, r.err);
  CHECK(r.out.find("row 0: score > 0.5 keeps") != std::string::npos);
  const auto ours = SafetensorsFile::open(out);
  const auto ref = SafetensorsFile::open(testing::fixture("realdim_public.safetensors"));
  for (const char* name : {"l10.logits", "l12.logits", "l20.logits"}) {
    const auto a = ours.tensor(name).as<float>(), b = ref.tensor(name).as<float>();
    REQUIRE(a.size() == b.size());
    int bad = 0;
    // Same tolerance as the library fixture test (tests/test_retriever_fixtures.cpp).
    for (size_t i = 0; i < a.size(); ++i) bad += !testing::close(a[i], b[i], 2e-3, 1e-3);
    CHECK_MESSAGE(bad == 0, name);
  }
  // The masks match the reference exactly on this input (the library test shows no entry
  // near the boundary for it).
  for (const char* name : {"keep_thr0.5_max", "keep_top64_max"}) {
    const auto a = ours.tensor(name).as<uint8_t>(), b = ref.tensor(name).as<uint8_t>();
    CHECK_MESSAGE(std::equal(a.begin(), a.end(), b.begin(), b.end()), name);
  }
  CHECK(ours.contains("ensemble_mean"));
  CHECK(ours.contains("keep_thr0.5_mean"));
}

TEST_CASE("make-checkpoint writes what the generator makes, and it loads back") {
  const std::string path = testing::scratch("synthetic_small.safetensors");
  const Result r = run_flashmem("make-checkpoint --seed 9 --hidden 64 --rank 32 --heads 2 --out " + path);
  REQUIRE_MESSAGE(r.code == 0, r.err);
  const RetrieverWeights loaded = load_retriever(path);
  const RetrieverWeights made = synthetic_retriever(9, SyntheticShape{64, 32, 2, {"l10", "l12", "l20"}});
  REQUIRE(loaded.layers.size() == 3);
  for (size_t l = 0; l < 3; ++l) {
    CHECK(loaded.layers[l].wq_a == made.layers[l].wq_a);
    CHECK(loaded.layers[l].wq_b == made.layers[l].wq_b);
    CHECK(loaded.layers[l].q_norm == made.layers[l].q_norm);
    CHECK(loaded.layers[l].weights_proj == made.layers[l].weights_proj);
  }
}

TEST_CASE("errors: one line, non-zero exit, no partial output") {
  const std::string out = testing::scratch("never_written.safetensors");
  std::filesystem::remove(out);
  Result r = run_flashmem("score --device cpu --ckpt /nonexistent.safetensors --out " + out);
  CHECK(r.code != 0);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("/nonexistent.safetensors") != std::string::npos);
  CHECK(!std::filesystem::exists(out));

  r = run_flashmem("score --device cpu --threshold 1.5");
  CHECK(r.code != 0);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("threshold") != std::string::npos);

  r = run_flashmem("score --device cpu --ensemble median");
  CHECK(r.code != 0);
  CHECK(r.err.find("--ensemble: 'median' is not an ensemble") != std::string::npos);

  r = run_flashmem("score --device cpu --n-chunks 0");
  CHECK(r.code != 0);
  CHECK(r.err.find("--n-chunks") != std::string::npos);
}
