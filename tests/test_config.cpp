// RunConfig: bad values give one-line flashmem::Error messages that name the key; YAML and
// --set fill the same fields; the resolved config round-trips through YAML.
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "src/common/error.hpp"
#include "src/loop/config.hpp"

using namespace flashmem;

namespace {

// Runs f, expects an Error whose one-line message contains `key`.
template <typename F>
void expect_error(F&& f, const std::string& key) {
  std::string message;
  try {
    f();
  } catch (const Error& e) {
    message = e.what();
  }
  INFO("message: '" << message << "'");
  REQUIRE(!message.empty());
  CHECK(message.find(key) != std::string::npos);
  CHECK(message.find('\n') == std::string::npos);
}

void expect_invalid(const std::string& assignment, const std::string& key) {
  RunConfig cfg;
  apply_override(cfg, assignment);
  expect_error([&] { cfg.validate(); }, key);
}

}  // namespace

TEST_CASE("the embedded default is valid") { CHECK_NOTHROW(RunConfig{}.validate()); }

TEST_CASE("tau <= 0") {
  expect_invalid("loop.tau=0", "loop.tau");
  expect_invalid("loop.tau=-1", "loop.tau");
}
TEST_CASE("steps < 0") { expect_invalid("loop.steps=-1", "loop.steps"); }
TEST_CASE("unknown policy") { expect_invalid("policy.kind=magic", "policy.kind"); }
TEST_CASE("cap < tail + sink") {
  RunConfig cfg;
  apply_yaml(cfg, "policy: {tail: 8, sink: 4, cap: 10}");
  expect_error([&] { cfg.validate(); }, "policy.cap");
}
TEST_CASE("N = 0") { expect_invalid("model.chunks=0", "model.chunks"); }
TEST_CASE("B = 0") { expect_invalid("loop.batch=0", "loop.batch"); }
TEST_CASE("unknown YAML key") {
  RunConfig cfg;
  expect_error([&] { apply_yaml(cfg, "loop:\n  taux: 3\n"); }, "loop.taux");
  expect_error([&] { apply_yaml(cfg, "looop:\n  tau: 3\n"); }, "looop");
  expect_error([&] { apply_override(cfg, "loop.taux=3"); }, "loop.taux");
}
TEST_CASE("wrong type") {
  RunConfig cfg;
  expect_error([&] { apply_yaml(cfg, "loop:\n  tau: abc\n"); }, "loop.tau");
  expect_error([&] { apply_yaml(cfg, "loop:\n  tau: 1.5\n"); }, "loop.tau");
  expect_error([&] { apply_yaml(cfg, "shadow:\n  enabled: maybe\n"); }, "shadow.enabled");
  expect_error([&] { apply_yaml(cfg, "policy:\n  threshold: [1, 2]\n"); }, "policy.threshold");
  expect_error([&] { apply_yaml(cfg, "loop: 3\n"); }, "loop");
  expect_error([&] { apply_override(cfg, "loop.steps=ten"); }, "loop.steps");
}
TEST_CASE("other bad values name their key") {
  expect_invalid("policy.select=best", "policy.select");
  expect_invalid("policy.threshold=1.5", "policy.threshold");
  expect_invalid("policy.ensemble=median", "policy.ensemble");
  expect_invalid("keys.mode=magic", "keys.mode");
  expect_invalid("memory.structure=fractal", "memory.structure");
  expect_invalid("device=tpu", "device");
  expect_invalid("model.heads=3", "model.heads");  // does not divide 4096
  expect_invalid("loop.prefill=0", "loop.prefill");
}

TEST_CASE("YAML and --set fill the same fields; to_yaml round-trips") {
  RunConfig a;
  apply_yaml(a, "loop:\n  tau: 32\n  steps: 7\npolicy:\n  kind: oracle\n  select: topk\nretriever:\n  layers: [l20, l10]\n");
  RunConfig b;
  apply_override(b, "loop.tau=32");
  apply_override(b, "loop.steps=7");
  apply_override(b, "policy.kind=oracle");
  apply_override(b, "policy.select=topk");
  apply_override(b, "retriever.layers=[l20, l10]");
  CHECK(to_yaml(a) == to_yaml(b));
  CHECK(a.loop.tau == 32);
  CHECK(a.retriever.layers == std::vector<std::string>{"l20", "l10"});
  RunConfig c;
  apply_yaml(c, to_yaml(a));
  CHECK(to_yaml(c) == to_yaml(a));
  RunConfig d;
  apply_yaml(d, to_yaml(RunConfig{}));  // every key written by to_yaml is accepted
  CHECK(to_yaml(d) == to_yaml(RunConfig{}));
}

TEST_CASE("configs/default.yaml is the embedded default") {
  const char* data = std::getenv("FLASHMEM_TEST_DATA");
  const std::string path = std::string(data ? data : "tests/data") + "/../../configs/default.yaml";
  RunConfig from_file;
  load_config_file(from_file, path);
  CHECK(to_yaml(from_file) == to_yaml(RunConfig{}));
}
