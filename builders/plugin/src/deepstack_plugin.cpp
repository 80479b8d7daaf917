/*
 * DeepstackAdd: a TensorRT IPluginV3 that adds one DeepStack level of Qwen3-VL to the hidden
 * states after a decoder layer, reading the row-stacked prompt table of TensorRT-LLM's prompt
 * tuning inputs (see include/deepstack_add.h for the layout).
 *
 *   inputs   0 hidden_states           [num_tokens, hidden]   float32 | float16 | bfloat16
 *            1 input_ids               [num_tokens]           int32
 *            2 prompt_embedding_table  [rows, hidden]         same type as 0
 *            3 tasks                   [num_tokens]           int32 (the request's slot)
 *            4 prompt_vocab_size       [1]                    int32 (rows per slot)
 *   output   0 hidden_states + level   [num_tokens, hidden]   same type as 0
 *   fields   vocab_size, levels, level (int32)
 *
 * The library registers its creator when it is loaded (LD_PRELOAD, dlopen, ctypes), under the
 * name "DeepstackAdd", version "1", namespace "qwen3vl".
 */
#include "deepstack_kernel.h"

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace qwen3vl
{
namespace deepstack
{
namespace
{

using namespace nvinfer1;
using nvinfer1::DataType;

char const* const kPluginName = "DeepstackAdd";
char const* const kPluginVersion = "1";
char const* const kPluginNamespace = "qwen3vl";

int32_t constexpr kHidden = 0;
int32_t constexpr kIds = 1;
int32_t constexpr kTable = 2;
int32_t constexpr kTasks = 3;
int32_t constexpr kPromptVocabSize = 4;
int32_t constexpr kNbInputs = 5;

void reportError(char const* what)
{
    std::fprintf(stderr, "[%s::%s] %s\n", kPluginNamespace, kPluginName, what);
}

int64_t volume(Dims const& dims, int32_t first, int32_t last)
{
    int64_t v = 1;
    for (int32_t i = first; i < last; ++i)
    {
        v *= dims.d[i];
    }
    return v;
}

class DeepstackAddPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit DeepstackAddPlugin(Params const& params)
        : mParams(params)
    {
        initFields();
    }

    DeepstackAddPlugin(DeepstackAddPlugin const& other)
        : mParams(other.mParams)
    {
        initFields();
    }

    DeepstackAddPlugin& operator=(DeepstackAddPlugin const&) = delete;

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new DeepstackAddPlugin(*this);
        }
        catch (std::exception const& e)
        {
            reportError(e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        return nbInputs == kNbInputs && nbOutputs == 1 ? 0 : -1;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != kNbInputs)
        {
            return -1;
        }
        outputTypes[0] = inputTypes[kHidden];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[kHidden].nbDims < 2 || inputs[kTable].nbDims != 2)
        {
            reportError("expects hidden_states [..., hidden], input_ids, table [rows, hidden], tasks, prompt_vocab_size");
            return -1;
        }
        outputs[0] = inputs[kHidden];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kHidden:
            return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF || desc.type == DataType::kBF16;
        case kIds:
        case kTasks:
        case kPromptVocabSize: return desc.type == DataType::kINT32;
        default: // the table and the output have the type of the hidden states
            return desc.type == inOut[kHidden].desc.type;
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override
    {
        return 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& hidden = inputDesc[kHidden].dims;
        int32_t const hiddenSize = static_cast<int32_t>(hidden.d[hidden.nbDims - 1]);
        int64_t const numTokens = volume(hidden, 0, hidden.nbDims - 1);
        Dims const& table = inputDesc[kTable].dims;
        if (volume(inputDesc[kIds].dims, 0, inputDesc[kIds].dims.nbDims) != numTokens
            || volume(inputDesc[kTasks].dims, 0, inputDesc[kTasks].dims.nbDims) != numTokens
            || table.d[1] != hiddenSize)
        {
            reportError("input_ids and tasks need one entry per token and the table the hidden size of hidden_states");
            return -1;
        }
        DataType const type = inputDesc[kHidden].type;
        ElementType const elementType = type == DataType::kFLOAT ? ElementType::kFLOAT
            : type == DataType::kHALF                            ? ElementType::kHALF
                                                                 : ElementType::kBF16;
        cudaError_t const status = launchDeepstackAdd(elementType, outputs[0], inputs[kHidden],
            static_cast<int32_t const*>(inputs[kIds]), static_cast<int32_t const*>(inputs[kTasks]), inputs[kTable],
            static_cast<int32_t const*>(inputs[kPromptVocabSize]), numTokens, hiddenSize, table.d[0], mParams, stream);
        if (status != cudaSuccess)
        {
            reportError(cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mFieldCollection;
    }

private:
    void initFields()
    {
        mFields = {
            PluginField("vocab_size", &mParams.vocabSize, PluginFieldType::kINT32, 1),
            PluginField("levels", &mParams.levels, PluginFieldType::kINT32, 1),
            PluginField("level", &mParams.level, PluginFieldType::kINT32, 1),
        };
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    Params mParams;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

class DeepstackAddPluginCreator : public IPluginCreatorV3One
{
public:
    DeepstackAddPluginCreator()
    {
        mFields = {
            PluginField("vocab_size", nullptr, PluginFieldType::kINT32, 1),
            PluginField("levels", nullptr, PluginFieldType::kINT32, 1),
            PluginField("level", nullptr, PluginFieldType::kINT32, 1),
        };
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        try
        {
            Params params{-1, -1, -1};
            for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
            {
                PluginField const& field = fc->fields[i];
                if (field.type != PluginFieldType::kINT32 || field.length != 1 || field.data == nullptr)
                {
                    continue;
                }
                int32_t const value = *static_cast<int32_t const*>(field.data);
                if (std::strcmp(field.name, "vocab_size") == 0)
                {
                    params.vocabSize = value;
                }
                else if (std::strcmp(field.name, "levels") == 0)
                {
                    params.levels = value;
                }
                else if (std::strcmp(field.name, "level") == 0)
                {
                    params.level = value;
                }
            }
            if (params.vocabSize < 0 || params.levels < 1 || params.level < 0 || params.level >= params.levels)
            {
                reportError("needs int32 fields vocab_size >= 0, levels >= 1 and 0 <= level < levels");
                return nullptr;
            }
            return new DeepstackAddPlugin(params);
        }
        catch (std::exception const& e)
        {
            reportError(e.what());
        }
        return nullptr;
    }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

//! Registers the creator when the library is loaded, so that LD_PRELOAD (tritonserver with the
//! tensorrtllm backend, which only loads TensorRT-LLM's own plugins) or ctypes.CDLL (the engine
//! build) is all it takes to make "DeepstackAdd" deserializable.
struct Registration
{
    Registration()
    {
        if (!getPluginRegistry()->registerCreator(creator, kPluginNamespace))
        {
            reportError("could not register the plugin creator (already registered?)");
        }
    }

    DeepstackAddPluginCreator creator;
};

Registration gRegistration;

} // namespace
} // namespace deepstack
} // namespace qwen3vl
