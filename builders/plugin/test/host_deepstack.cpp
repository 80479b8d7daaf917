/*
 * The kernel's per-token work, run on the CPU: the same tableRow/addToken/addTokenPacked the CUDA
 * kernels call, driven by a host loop instead of the grid. Built into a small shared library by
 * tests/test_trtllm_plugin.py and compared with qwen3vl_triton.table.deepstack_add_reference.
 */
#include "deepstack_add.h"

extern "C" int64_t qwen3vl_deepstack_table_row(
    int32_t tokenId, int32_t task, int32_t promptVocabSize, int64_t tableRows, int32_t vocabSize, int32_t levels,
    int32_t level)
{
    return qwen3vl::deepstack::tableRow(tokenId, task, promptVocabSize, tableRows, {vocabSize, levels, level});
}

extern "C" void qwen3vl_deepstack_add_f32(float* out, float const* hidden, int32_t const* ids, int32_t const* tasks,
    float const* table, int32_t promptVocabSize, int64_t numTokens, int32_t hiddenSize, int64_t tableRows,
    int32_t vocabSize, int32_t levels, int32_t level)
{
    qwen3vl::deepstack::Params const params{vocabSize, levels, level};
    for (int64_t t = 0; t < numTokens; ++t)
    {
        int64_t const row = qwen3vl::deepstack::tableRow(ids[t], tasks[t], promptVocabSize, tableRows, params);
        qwen3vl::deepstack::addToken(out + t * hiddenSize, hidden + t * hiddenSize, table, row, hiddenSize, 0, 1);
    }
}

//! The packed path (4 floats = 16 bytes per step), as the CUDA kernel takes it for aligned rows of a
//! hidden size that is a multiple of 4; `step` packs per thread step, as blockDim.x in the kernel.
extern "C" void qwen3vl_deepstack_add_f32_packed(float* out, float const* hidden, int32_t const* ids,
    int32_t const* tasks, float const* table, int32_t promptVocabSize, int64_t numTokens, int32_t hiddenSize,
    int64_t tableRows, int32_t vocabSize, int32_t levels, int32_t level, int32_t step)
{
    qwen3vl::deepstack::Params const params{vocabSize, levels, level};
    for (int64_t t = 0; t < numTokens; ++t)
    {
        int64_t const row = qwen3vl::deepstack::tableRow(ids[t], tasks[t], promptVocabSize, tableRows, params);
        for (int32_t first = 0; first < step; ++first)
        {
            qwen3vl::deepstack::addTokenPacked<float, 4>(
                out + t * hiddenSize, hidden + t * hiddenSize, table, row, hiddenSize, first, step);
        }
    }
}
