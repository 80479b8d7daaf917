/*
 * Launcher of the DeepstackAdd CUDA kernel. No TensorRT types: the kernel translation unit
 * builds (and is compile-checked) without the TensorRT headers.
 */
#pragma once

#include "deepstack_add.h"

#include <cuda_runtime_api.h>
#include <cstdint>

namespace qwen3vl
{
namespace deepstack
{

enum class ElementType
{
    kFLOAT,
    kHALF,
    kBF16
};

//! out[t] = hidden[t] + table[tableRow(ids[t], tasks[t], *promptVocabSize)] for t < numTokens.
//! hidden/out: [numTokens, hiddenSize]; table: [tableRows, hiddenSize] of `type`; ids, tasks:
//! [numTokens] int32; promptVocabSize: one int32, in device memory (it is an engine tensor).
cudaError_t launchDeepstackAdd(ElementType type, void* out, void const* hidden, int32_t const* ids,
    int32_t const* tasks, void const* table, int32_t const* promptVocabSize, int64_t numTokens,
    int32_t hiddenSize, int64_t tableRows, Params const& params, cudaStream_t stream);

} // namespace deepstack
} // namespace qwen3vl
