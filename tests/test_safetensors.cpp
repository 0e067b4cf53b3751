// safetensors reader/writer: round trips and every malformed-file error, one case each.
// Each bad file is written by hand here so the test controls exactly what is wrong.
#include <doctest/doctest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;

namespace {

// Writes 8-byte length + header + data as given (no validation: the point is bad files).
std::string raw_file(const std::string& name, const std::string& header, size_t data_bytes,
                     int64_t length_override = -1) {
  const std::string path = testing::scratch(name);
  std::ofstream out(path, std::ios::binary);
  const uint64_t len = length_override >= 0 ? uint64_t(length_override) : header.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << header;
  out << std::string(data_bytes, '\0');
  return path;
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("round trip through the atomic writer") {
  SafetensorsWriter w;
  const std::vector<float> f = {1.0f, -2.5f, 3.25f, 0.0f, 7.0f, 8.0f};
  const std::vector<int64_t> i = {-1, 4000000000LL};
  const std::vector<uint16_t> bf = {0x3F80, 0xC000};  // 1.0, -2.0
  w.add_f32("a.f", {2, 3}, f);
  w.add_i64("b.i", {2}, i);
  w.add_bf16_bits("c.bf", {2}, bf);
  const std::string path = testing::scratch("roundtrip.safetensors");
  w.write(path);
  const auto file = SafetensorsFile::open(path);
  CHECK(file.names() == std::vector<std::string>{"a.f", "b.i", "c.bf"});
  CHECK(file.tensor("a.f").shape == std::vector<int64_t>{2, 3});
  CHECK(file.read_f32("a.f") == f);
  CHECK(file.read_i64("b.i") == i);
  CHECK(file.read_f32("c.bf") == std::vector<float>{1.0f, -2.0f});
}

TEST_CASE("F16 widening is exact") {
  CHECK(f16_bits_to_float(0x3C00) == 1.0f);
  CHECK(f16_bits_to_float(0xC000) == -2.0f);
  CHECK(f16_bits_to_float(0x7BFF) == 65504.0f);
  CHECK(f16_bits_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_bits_to_float(0x03FF) == std::ldexp(1023.0f, -24));
  CHECK(std::isinf(f16_bits_to_float(0x7C00)));
}

TEST_CASE("a fixture opens and views are typed") {
  const auto file = SafetensorsFile::open(testing::fixture("retriever_small.safetensors"));
  const auto& t = file.tensor("retrievers.l10.wq_a.weight");
  CHECK(t.dtype == DType::F32);
  CHECK(t.numel() == 64 * 128);
  CHECK_THROWS_AS(t.as<uint8_t>(), Error);
}

TEST_CASE("truncated file") {
  const std::string path = testing::scratch("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  const std::string e = error_of(path);
  CHECK(contains(e, path));
  CHECK(contains(e, "truncated"));
}

TEST_CASE("header length past the end") {
  const std::string e = error_of(raw_file("longheader.safetensors", "{}", 0, 1000));
  CHECK(contains(e, "header length 1000 runs past the end"));
}

TEST_CASE("header that is not JSON") {
  CHECK(contains(error_of(raw_file("notjson.safetensors", "{not json", 0)), "not valid JSON"));
}

TEST_CASE("unknown dtype") {
  const std::string e = error_of(raw_file("dtype.safetensors", R"({"x":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[0,2]}})", 2));
  CHECK(contains(e, "tensor 'x'"));
  CHECK(contains(e, "unknown dtype"));
}

TEST_CASE("offsets out of range") {
  const std::string e = error_of(raw_file("range.safetensors", R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
  CHECK(contains(e, "tensor 'x'"));
  CHECK(contains(e, "out of range"));
}

TEST_CASE("overlapping tensors") {
  const std::string e = error_of(raw_file("overlap.safetensors",
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
  CHECK(contains(e, "overlap"));
}

TEST_CASE("shape and size mismatch (a lying header)") {
  const std::string e = error_of(raw_file("lying.safetensors", R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
  CHECK(contains(e, "tensor 'x'"));
  CHECK(contains(e, "needs 12 bytes but data_offsets span 8"));
}

TEST_CASE("expect() names the key and the wanted dtype and shape") {
  const auto file = SafetensorsFile::open(testing::fixture("retriever_small.safetensors"));
  try {
    file.expect("retrievers.l10.wq_a.weight", {DType::U8}, {64, 128});
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(contains(e.what(), "retrievers.l10.wq_a.weight"));
    CHECK(contains(e.what(), "expected U8"));
  }
  try {
    file.expect("retrievers.l10.wq_a.weight", {DType::F32}, {64, 127});
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(contains(e.what(), "expected [64, 127]"));
  }
  CHECK_THROWS_WITH_AS(file.tensor("nope"), doctest::Contains("missing tensor 'nope'"), Error);
}

TEST_CASE("writer leaves no partial file when the target cannot be written") {
  SafetensorsWriter w;
  const std::vector<float> f = {1.0f};
  w.add_f32("a", {1}, f);
  CHECK_THROWS_AS(w.write("/nonexistent-dir/x.safetensors"), Error);
}
