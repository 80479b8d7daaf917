/*
 * A C entry point to the DeepstackAdd kernel launcher, for ctypes: tests/gpu/deepstack_gpu.py builds
 * this file with src/deepstack_kernel.cu into one shared library and calls it on torch's device
 * tensors (the device check), or only loads it where no GPU is (make test).
 *
 * Pointers are device pointers, `stream` a cudaStream_t (torch's current stream); the return value
 * is the cudaError_t of the launch (0: launched).
 */
#include "deepstack_kernel.h"

extern "C" int qwen3vl_deepstack_launch(int32_t elementType, void* out, void const* hidden, int32_t const* ids,
    int32_t const* tasks, void const* table, int32_t const* promptVocabSize, int64_t numTokens, int32_t hiddenSize,
    int64_t tableRows, int32_t vocabSize, int32_t levels, int32_t level, void* stream)
{
    using qwen3vl::deepstack::ElementType;
    if (elementType < 0 || elementType > static_cast<int32_t>(ElementType::kBF16))
    {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    qwen3vl::deepstack::Params const params{vocabSize, levels, level};
    return static_cast<int>(qwen3vl::deepstack::launchDeepstackAdd(static_cast<ElementType>(elementType), out, hidden,
        ids, tasks, table, promptVocabSize, numTokens, hiddenSize, tableRows, params,
        static_cast<cudaStream_t>(stream)));
}

//! The CUDA error's name, for messages.
extern "C" char const* qwen3vl_deepstack_error_name(int error)
{
    return cudaGetErrorName(static_cast<cudaError_t>(error));
}

//! cudaStreamSynchronize on `stream`, returning its error (errors of an earlier launch surface here).
extern "C" int qwen3vl_deepstack_sync(void* stream)
{
    return static_cast<int>(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
}
