// Host-side CUDA helpers shared by the CUDA backends (built only with nvcc present):
// checked calls that throw flashmem::Error naming file:line and the call, and grow-only
// device and pinned buffers whose allocation failures name the buffer and the size asked.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>

namespace flashmem {

void check_cuda(cudaError_t err, const char* what, const char* file, int line);
void check_cublas(cublasStatus_t status, const char* what, const char* file, int line);

#define FM_CUDA(expr) ::flashmem::check_cuda((expr), #expr, __FILE__, __LINE__)
#define FM_CUBLAS(expr) ::flashmem::check_cublas((expr), #expr, __FILE__, __LINE__)

// Allocates `bytes` of device memory for `what`; first compares with the free memory so that
// an oversized request is an Error naming the size asked, not a crash or a sticky error.
void* allocate_device(size_t bytes, const char* what);
// Mapped pinned host memory: kernels read and write it directly (no copy-engine transfer).
void* allocate_pinned(size_t bytes, void** device_ptr);

// Bytes of one element of the buffers below: sizeof(T), 1 for void (a byte buffer).
template <typename T>
inline constexpr size_t element_bytes = sizeof(T);
template <>
inline constexpr size_t element_bytes<void> = 1;

// A device array of T (void: bytes) that is reallocated only when a call needs more.
template <typename T = void>
class DeviceBuffer {
  static constexpr size_t kElement = element_bytes<T>;

 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }

  // At least `count` elements; contents are not kept when it grows. `total`, when given,
  // tracks the bytes held by a set of buffers.
  T* reserve(size_t count, const char* what = "a device buffer", size_t* total = nullptr) {
    const size_t bytes = std::max<size_t>(count, 1) * kElement;
    if (bytes <= bytes_) return ptr_;
    cudaFree(ptr_);
    if (total) *total -= bytes_;
    ptr_ = nullptr;
    bytes_ = 0;
    ptr_ = static_cast<T*>(allocate_device(bytes, what));
    bytes_ = bytes;
    if (total) *total += bytes;
    return ptr_;
  }
  T* get() const { return ptr_; }
  size_t size_bytes() const { return bytes_; }
  template <typename U>
  U* as() const { return static_cast<U*>(static_cast<void*>(ptr_)); }

 private:
  T* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Mapped pinned host staging of T (void: bytes), grow-only.
template <typename T = void>
class PinnedBuffer {
  static constexpr size_t kElement = element_bytes<T>;

 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { cudaFreeHost(ptr_); }

  T* reserve(size_t count) {
    const size_t bytes = std::max<size_t>(count, 1) * kElement;
    if (bytes <= bytes_) return ptr_;
    cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    void* device = nullptr;
    ptr_ = static_cast<T*>(allocate_pinned(bytes, &device));
    device_ptr_ = static_cast<T*>(device);
    bytes_ = bytes;
    return ptr_;
  }
  T* device_ptr() const { return device_ptr_; }

 private:
  T* ptr_ = nullptr;
  T* device_ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace flashmem
