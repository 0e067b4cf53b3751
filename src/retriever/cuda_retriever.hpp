// The CUDA backend of Retriever (built only with nvcc; see kernels/ for the kernels).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "src/retriever/retriever.hpp"

namespace flashmem {

// True when the CUDA runtime sees a device; otherwise why_not says why (no driver, no GPU).
bool cuda_device_present(std::string* why_not);

std::unique_ptr<Retriever> make_cuda_retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options);

// The CUDA retriever with its device-pointer entry points (inputs already resident on the
// device are not copied again; results stay on the device). Device memory is allocated on
// first use, grows only when a call needs more, and is reused across calls.
class CudaRetriever : public Retriever {
 public:
  struct DeviceInputs {
    const float* hidden = nullptr;    // device [B, D] float32
    const uint8_t* keys = nullptr;    // device [B, N, 132], 4-byte aligned
    int64_t batch = 0, chunks = 0;
    std::span<const int64_t> positions;  // host [B]
  };
  struct DeviceSelection {
    const uint8_t* keep = nullptr;       // device [B, N]
    const long long* kept_count = nullptr;  // device [B]
    const int64_t* top_indices = nullptr;   // device [B, min(k, N)] (top-k only)
  };

  // Scores on the device; returns the device [B, N] ensemble (valid until the next call).
  // layer_logits, when asked, go to device [L, B, N] (layer_logits_device()). check_keys:
  // wait for the kernel and throw naming the first chunk with an fp8 NaN byte or a
  // non-finite scale (as the CPU backend); without it the call returns without a sync.
  virtual const float* score_device(const DeviceInputs& in, bool with_layer_logits = false, bool check_keys = true) = 0;
  virtual const float* layer_logits_device() const = 0;
  // Selects on the device from the last score_device/score call's scores.
  virtual DeviceSelection select_device(const SelectRule& rule) = 0;
  // score_device(in) then select_device(rule) as one CUDA graph launch and one wait (with the
  // key check): the same results, without the second launch's latency.
  virtual DeviceSelection score_select_device(const DeviceInputs& in, const SelectRule& rule) = 0;
  virtual void synchronize() = 0;
  // The stream all of this retriever's device work runs on (a cudaStream_t), for timing.
  virtual void* stream() const = 0;
  // Bytes of device memory this retriever holds (weights, buffers, cuBLAS workspace).
  virtual size_t device_bytes() const = 0;

 protected:
  using Retriever::Retriever;
};

}  // namespace flashmem
