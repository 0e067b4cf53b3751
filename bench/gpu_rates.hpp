// Measured device figures, for benchmark floors (built with CUDA only).
#pragma once

namespace flashmem::bench {

// Device-to-device copy of 1 GiB, bytes read + written per second (as DEVICE.md counts
// them); best of 5 after a warm-up.
double measure_device_copy_bandwidth();

// cuBLAS bf16 GEMM 8192^3 with fp32 accumulation, FLOP/s; best of 5 after a warm-up.
double measure_bf16_gemm_rate();

}  // namespace flashmem::bench
