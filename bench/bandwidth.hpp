// Measured host read bandwidth, for benchmark floors: every worker thread streams its part
// of a buffer much larger than the caches; best of a few passes.
#pragma once

namespace flashmem::bench {

double measure_host_read_bandwidth();  // bytes per second

}  // namespace flashmem::bench
