// Programmatic dependent launch (sm_90) for the retriever's kernel chain: a kernel launched
// with launch_chained() may start while its predecessor in the stream is still running; it
// must call grid_dependency_wait() before it reads anything the predecessor writes (the wait
// returns once the predecessor grid has completed and its memory is visible, and is a no-op
// for a kernel launched without the attribute). Every kernel of the chain calls
// allow_dependents() first, so that its successor's blocks can be scheduled early and do
// their independent work (weight loads, key tiles) under the predecessor's tail.
// Inside a stream capture these become programmatic edges of the CUDA graph.
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace flashmem::kernels {

__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the
// stream's previous kernel when `chained` (callers pass false after a non-kernel operation).
template <typename... Params, typename... Args>
cudaError_t launch_chained(bool chained, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = chained ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace flashmem::kernels
