/*
 * DeepStack add: the index arithmetic and the per-token add of the DeepstackAdd plugin.
 *
 * Everything here is plain C++ that nvcc compiles for the device (the kernel in
 * src/deepstack_kernel.cu calls it) and any host compiler compiles for the CPU (the tests
 * check it against qwen3vl_triton.table.deepstack_row / deepstack_add_reference).
 *
 * The batched prompt table is the one TensorRT-LLM's inflight batcher builds
 * (PromptTuningBuffers::fill): request b of the step owns rows [b * P, (b + 1) * P) where
 * P = prompt_vocab_size (the engine input, = max_prompt_embedding_table_size / max_batch_size),
 * and `tasks[t]` is the slot b of token t -- the same addressing PromptTuningEmbedding uses.
 * Inside a slot the table is row-stacked (docs/design.md §3): stride S = P / (levels + 1), rows
 * [0, S) are the image embeddings, rows [(k + 1) S, (k + 1) S + n) DeepStack level k.
 */
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QWEN3VL_HOST_DEVICE __host__ __device__
#else
#define QWEN3VL_HOST_DEVICE
#endif

namespace qwen3vl
{
namespace deepstack
{

struct Params
{
    int32_t vocabSize; // first prompt-table id: fake id vocabSize + j reads table row j
    int32_t levels;    // DeepStack levels in the table (3 for Qwen3-VL)
    int32_t level;     // the level added by this op, 0 <= level < levels (= the decoder layer before it)
};

//! Row of the batched table added to a token with id `tokenId` of slot `task`, or -1: add nothing.
//! Only prompt-table ids vocabSize + j with 0 <= j < S get a row; text ids, and rows past the
//! table (`tableRows`), get -1.
QWEN3VL_HOST_DEVICE inline int64_t tableRow(
    int32_t tokenId, int32_t task, int32_t promptVocabSize, int64_t tableRows, Params const& p)
{
    int32_t const stride = promptVocabSize / (p.levels + 1);
    int32_t const j = tokenId - p.vocabSize;
    if (j < 0 || j >= stride || task < 0)
    {
        return -1;
    }
    int64_t const row = static_cast<int64_t>(task) * promptVocabSize + static_cast<int64_t>(p.level + 1) * stride + j;
    return row < tableRows ? row : -1;
}

//! dst[h] = src[h] + (row >= 0 ? table[row][h] : 0) for h = first, first + step, ... < hidden.
//! The sum is taken in float, then rounded to T once (as the unfused elementwise add does).
template <typename T>
QWEN3VL_HOST_DEVICE inline void addToken(
    T* dst, T const* src, T const* table, int64_t row, int32_t hidden, int32_t first, int32_t step)
{
    if (row < 0)
    {
        for (int32_t h = first; h < hidden; h += step)
        {
            dst[h] = src[h];
        }
        return;
    }
    T const* add = table + row * hidden;
    for (int32_t h = first; h < hidden; h += step)
    {
        dst[h] = static_cast<T>(static_cast<float>(src[h]) + static_cast<float>(add[h]));
    }
}

//! N elements of T moved as one aligned load or store (16 bytes: the widest a CUDA thread issues).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack
{
    T v[N];
};

//! addToken over packs of N elements: pack p holds elements [p N, (p + 1) N) of a row, and
//! first/step count packs. The same sums and roundings as addToken, element by element; needs
//! hidden % N == 0 and dst, src and table aligned to sizeof(T) * N bytes (so is every row then).
template <typename T, int N>
QWEN3VL_HOST_DEVICE inline void addTokenPacked(
    T* dst, T const* src, T const* table, int64_t row, int32_t hidden, int32_t first, int32_t step)
{
    using P = Pack<T, N>;
    P* out = reinterpret_cast<P*>(dst);
    P const* in = reinterpret_cast<P const*>(src);
    int32_t const packs = hidden / N;
    if (row < 0)
    {
        for (int32_t p = first; p < packs; p += step)
        {
            out[p] = in[p];
        }
        return;
    }
    P const* add = reinterpret_cast<P const*>(table + row * hidden);
    for (int32_t p = first; p < packs; p += step)
    {
        P x = in[p];
        P const y = add[p];
        for (int32_t k = 0; k < N; ++k)
        {
            x.v[k] = static_cast<T>(static_cast<float>(x.v[k]) + static_cast<float>(y.v[k]));
        }
        out[p] = x;
    }
}

} // namespace deepstack
} // namespace qwen3vl
