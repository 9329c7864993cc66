// The GPU's thread group for the row algorithms of epilogue.h: one thread block per token row.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "epilogue.h"

namespace opd_fast {

// Threads per block of every epilogue kernel; a power of two (all_reduce halves it).
constexpr int kThreads = 256;

struct BlockGroup {
  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return kThreads; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }

  __device__ __forceinline__ int append(int* count) const { return atomicAdd(count, 1); }
};

// nullptr when the last launch succeeded, else CUDA's message for the bindings to raise.
inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline cudaStream_t as_stream(std::intptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace opd_fast
