#include "src/common/cuda_support.hpp"

#include "src/common/error.hpp"

namespace flashmem {

namespace {
constexpr double kMiB = 1024.0 * 1024.0;

const char* cublas_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}
}  // namespace

void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    fail(file, ":", line, ": CUDA call failed: ", what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

void check_cublas(cublasStatus_t s, const char* what, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail(file, ":", line, ": cuBLAS call failed: ", what, ": ", cublas_name(s), " (", static_cast<int>(s), ")");
}

void* allocate_device(size_t bytes, const char* what) {
  size_t free_bytes = 0, total_bytes = 0;
  FM_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (bytes > free_bytes)
    fail("cuda: ", what, " needs ", bytes, " bytes (", bytes / kMiB, " MiB) of device memory but only ", free_bytes / kMiB,
         " MiB are free");
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the allocation error so later calls do not see it
    fail("cuda: ", what, " needs ", bytes, " bytes (", bytes / kMiB, " MiB) of device memory: cudaMalloc failed (",
         cudaGetErrorString(err), ")");
  }
  return ptr;
}

void* allocate_pinned(size_t bytes, void** device_ptr) {
  void* ptr = nullptr;
  FM_CUDA(cudaHostAlloc(&ptr, bytes, cudaHostAllocMapped));
  FM_CUDA(cudaHostGetDevicePointer(device_ptr, ptr, 0));
  return ptr;
}

}  // namespace flashmem
