// Test helpers: where the golden fixtures live and small comparison utilities.
#pragma once
#include <cmath>
#include <cstdlib>
#include <string>

namespace flashmem::testing {

// tests/data, as set by meson (FLASHMEM_TEST_DATA); falls back to the source layout.
inline std::string fixture(const std::string& name) {
  const char* dir = std::getenv("FLASHMEM_TEST_DATA");
  return std::string(dir ? dir : "tests/data") + "/" + name;
}

// A fresh scratch path under the build's temp dir.
inline std::string scratch(const std::string& name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/flashmem_test_" + name;
}

// |a - b| <= abs_tol + rel_tol * |b|
inline bool close(double a, double b, double abs_tol, double rel_tol) {
  return std::fabs(a - b) <= abs_tol + rel_tol * std::fabs(b);
}

}  // namespace flashmem::testing
