/*
 * The DeepstackAdd kernel: one block per token, the block's threads stride over the hidden size,
 * with 16-byte loads and stores when the rows allow them (hidden size a multiple of the pack,
 * aligned buffers), else element by element. The index arithmetic and the add itself are
 * deepstack_add.h's (tableRow, addToken, addTokenPacked), shared with the host tests.
 */
#include "deepstack_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qwen3vl
{
namespace deepstack
{
namespace
{

template <typename T>
__global__ void deepstackAddKernel(T* out, T const* hidden, int32_t const* ids, int32_t const* tasks,
    T const* table, int32_t const* promptVocabSize, int64_t numTokens, int32_t hiddenSize, int64_t tableRows,
    Params params)
{
    int32_t const vocab = *promptVocabSize;
    for (int64_t t = blockIdx.x; t < numTokens; t += gridDim.x)
    {
        int64_t const row = tableRow(ids[t], tasks[t], vocab, tableRows, params);
        addToken(out + t * hiddenSize, hidden + t * hiddenSize, table, row, hiddenSize,
            static_cast<int32_t>(threadIdx.x), static_cast<int32_t>(blockDim.x));
    }
}

//! The same with 16-byte loads and stores (kPack elements per thread and step).
template <typename T, int kPack>
__global__ void deepstackAddPackedKernel(T* out, T const* hidden, int32_t const* ids, int32_t const* tasks,
    T const* table, int32_t const* promptVocabSize, int64_t numTokens, int32_t hiddenSize, int64_t tableRows,
    Params params)
{
    int32_t const vocab = *promptVocabSize;
    for (int64_t t = blockIdx.x; t < numTokens; t += gridDim.x)
    {
        int64_t const row = tableRow(ids[t], tasks[t], vocab, tableRows, params);
        addTokenPacked<T, kPack>(out + t * hiddenSize, hidden + t * hiddenSize, table, row, hiddenSize,
            static_cast<int32_t>(threadIdx.x), static_cast<int32_t>(blockDim.x));
    }
}

bool aligned16(void const* p)
{
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

template <typename T>
cudaError_t launch(void* out, void const* hidden, int32_t const* ids, int32_t const* tasks, void const* table,
    int32_t const* promptVocabSize, int64_t numTokens, int32_t hiddenSize, int64_t tableRows, Params const& params,
    cudaStream_t stream)
{
    int64_t constexpr kMaxBlocks = 65536;
    int constexpr kPack = static_cast<int>(16 / sizeof(T));
    auto const blocks = static_cast<unsigned int>(numTokens < kMaxBlocks ? numTokens : kMaxBlocks);
    bool const packed = hiddenSize % kPack == 0 && aligned16(out) && aligned16(hidden) && aligned16(table);
    // one thread per element (or pack) of a row, in whole warps, at most 256
    int32_t const work = packed ? hiddenSize / kPack : hiddenSize;
    int32_t const threads = work >= 256 ? 256 : ((work + 31) / 32) * 32;
    if (packed)
    {
        deepstackAddPackedKernel<T, kPack><<<blocks, threads, 0, stream>>>(static_cast<T*>(out),
            static_cast<T const*>(hidden), ids, tasks, static_cast<T const*>(table), promptVocabSize, numTokens,
            hiddenSize, tableRows, params);
    }
    else
    {
        deepstackAddKernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(out), static_cast<T const*>(hidden),
            ids, tasks, static_cast<T const*>(table), promptVocabSize, numTokens, hiddenSize, tableRows, params);
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t launchDeepstackAdd(ElementType type, void* out, void const* hidden, int32_t const* ids,
    int32_t const* tasks, void const* table, int32_t const* promptVocabSize, int64_t numTokens,
    int32_t hiddenSize, int64_t tableRows, Params const& params, cudaStream_t stream)
{
    if (numTokens <= 0 || hiddenSize <= 0)
    {
        return cudaSuccess;
    }
    switch (type)
    {
    case ElementType::kFLOAT:
        return launch<float>(
            out, hidden, ids, tasks, table, promptVocabSize, numTokens, hiddenSize, tableRows, params, stream);
    case ElementType::kHALF:
        return launch<__half>(
            out, hidden, ids, tasks, table, promptVocabSize, numTokens, hiddenSize, tableRows, params, stream);
    case ElementType::kBF16:
        return launch<__nv_bfloat16>(
            out, hidden, ids, tasks, table, promptVocabSize, numTokens, hiddenSize, tableRows, params, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace deepstack
} // namespace qwen3vl
