// A minimal fork-join parallel loop over [0, n): contiguous blocks, one per hardware thread.
#pragma once
#include <cstdint>
#include <functional>

namespace flashmem {

// Number of worker threads used by parallel_for (hardware concurrency, at least 1;
// FLASHMEM_THREADS overrides).
int worker_count();

// Calls body(begin, end) on disjoint blocks covering [0, n), in parallel; returns when all
// are done. The first exception thrown by a block is rethrown here.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body);

}  // namespace flashmem
