/*
 * CPU harness for the DeepstackAdd plugin object (needs the TensorRT headers, not the library).
 *
 * Linked with src/deepstack_plugin.cpp into one shared library, it stands in for libnvinfer's
 * plugin registry (so the plugin's load-time registration is observed) and for the CUDA launcher
 * (so enqueue runs the header's host loop on host pointers). tests/test_trtllm_plugin.py drives it
 * with ctypes: the creator must be registered under its name/version/namespace, create a plugin
 * from the fields, report the formats TensorRT may pick, survive serialization (fields ->
 * kRUNTIME creation), clone, and compute the add through enqueue.
 */
#include "deepstack_add.h"
#include "deepstack_kernel.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

class RecordingRegistry : public IPluginRegistry
{
public:
    std::vector<IPluginCreatorInterface*> creators;
    std::vector<std::string> namespaces;

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const pluginNamespace) noexcept override
    {
        creators.push_back(&creator);
        namespaces.emplace_back(pluginNamespace);
        return true;
    }

    IPluginCreatorInterface* getCreator(AsciiChar const* const name, AsciiChar const* const version,
        AsciiChar const* const pluginNamespace = "") noexcept override
    {
        for (size_t i = 0; i < creators.size(); ++i)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
            if (std::strcmp(c->getPluginName(), name) == 0 && std::strcmp(c->getPluginVersion(), version) == 0
                && namespaces[i] == pluginNamespace)
            {
                return c;
            }
        }
        return nullptr;
    }

    // Not used by the plugin.
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override { *n = 0; return nullptr; }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const,
        AsciiChar const* const) noexcept override { return nullptr; }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        *n = static_cast<int32_t>(creators.size());
        return creators.data();
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource* r) noexcept override { return r; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        return getAllCreators(n);
    }
};

RecordingRegistry& registry()
{
    static RecordingRegistry instance;
    return instance;
}

PluginTensorDesc desc(DataType type, std::vector<int64_t> const& dims)
{
    PluginTensorDesc d{};
    d.type = type;
    d.format = TensorFormat::kLINEAR;
    d.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.dims.d[i] = dims[i];
    }
    return d;
}

} // namespace

// libnvinfer's entry point, as the plugin library calls it when loaded.
extern "C" IPluginRegistry* getPluginRegistry() noexcept
{
    return &registry();
}

extern "C" char const* cudaGetErrorString(cudaError_t)
{
    return "cuda error";
}

// The CUDA launcher, replaced by the header's host loop (float only).
namespace qwen3vl::deepstack
{
cudaError_t launchDeepstackAdd(ElementType type, void* out, void const* hidden, int32_t const* ids,
    int32_t const* tasks, void const* table, int32_t const* promptVocabSize, int64_t numTokens, int32_t hiddenSize,
    int64_t tableRows, Params const& params, cudaStream_t)
{
    if (type != ElementType::kFLOAT)
    {
        return cudaErrorInvalidValue;
    }
    for (int64_t t = 0; t < numTokens; ++t)
    {
        int64_t const row = tableRow(ids[t], tasks[t], *promptVocabSize, tableRows, params);
        addToken(static_cast<float*>(out) + t * hiddenSize, static_cast<float const*>(hidden) + t * hiddenSize,
            static_cast<float const*>(table), row, hiddenSize, 0, 1);
    }
    return cudaSuccess;
}
} // namespace qwen3vl::deepstack

//! Name, version and namespace of registered creator `i`, joined by '/'; empty past the end.
extern "C" int32_t harness_registered(int32_t i, char* out, int32_t size)
{
    if (i >= static_cast<int32_t>(registry().creators.size()))
    {
        return 0;
    }
    auto* c = static_cast<IPluginCreatorV3One*>(registry().creators[i]);
    std::string s = std::string(c->getPluginName()) + "/" + c->getPluginVersion() + "/" + registry().namespaces[i]
        + "/" + c->getPluginNamespace();
    std::strncpy(out, s.c_str(), size);
    return 1;
}

//! Create the plugin from fields (build phase), check it, serialize and re-create it (runtime
//! phase), clone it and run enqueue on host memory. Returns 0 on success, the failed step otherwise.
extern "C" int32_t harness_run(int32_t vocabSize, int32_t levels, int32_t level, float* out, float const* hidden,
    int32_t const* ids, int32_t const* tasks, float const* table, int32_t const* promptVocabSize, int64_t numTokens,
    int32_t hiddenSize, int64_t tableRows)
{
    auto* creator = static_cast<IPluginCreatorV3One*>(registry().getCreator("DeepstackAdd", "1", "qwen3vl"));
    if (creator == nullptr)
    {
        return 1;
    }
    std::vector<PluginField> fields{{"vocab_size", &vocabSize, PluginFieldType::kINT32, 1},
        {"levels", &levels, PluginFieldType::kINT32, 1}, {"level", &level, PluginFieldType::kINT32, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> built(creator->createPlugin("deepstack_add", &fc, TensorRTPhase::kBUILD));
    if (!built)
    {
        return 2;
    }

    auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    DynamicPluginTensorDesc io[6]{};
    DataType const types[6]{DataType::kHALF, DataType::kINT32, DataType::kHALF, DataType::kINT32, DataType::kINT32,
        DataType::kHALF};
    for (int32_t i = 0; i < 6; ++i)
    {
        io[i].desc.type = types[i];
        io[i].desc.format = TensorFormat::kLINEAR;
    }
    for (int32_t pos = 0; pos < 6; ++pos)
    {
        if (!build->supportsFormatCombination(pos, io, 5, 1))
        {
            return 10 + pos;
        }
    }
    io[2].desc.type = DataType::kFLOAT; // a table of another type than the hidden states
    if (build->supportsFormatCombination(2, io, 5, 1))
    {
        return 16;
    }
    DataType outType{};
    DataType const inTypes[5]{DataType::kBF16, DataType::kINT32, DataType::kBF16, DataType::kINT32, DataType::kINT32};
    if (build->getOutputDataTypes(&outType, 1, inTypes, 5) != 0 || outType != DataType::kBF16
        || build->getNbOutputs() != 1)
    {
        return 3;
    }

    // serialization: the fields TensorRT stores in the engine re-create an equal plugin
    auto* runtime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::unique_ptr<IPluginV3> restored(
        creator->createPlugin("deepstack_add", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
    if (!restored)
    {
        return 4;
    }
    std::unique_ptr<IPluginV3> attached(
        static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
            ->attachToContext(nullptr));
    if (!attached)
    {
        return 5;
    }
    auto* core = static_cast<IPluginV3OneCore*>(attached->getCapabilityInterface(PluginCapabilityType::kCORE));
    if (std::strcmp(core->getPluginName(), "DeepstackAdd") != 0 || std::strcmp(core->getPluginNamespace(), "qwen3vl"))
    {
        return 6;
    }

    PluginTensorDesc inputs[5]{desc(DataType::kFLOAT, {numTokens, hiddenSize}), desc(DataType::kINT32, {numTokens}),
        desc(DataType::kFLOAT, {tableRows, hiddenSize}), desc(DataType::kINT32, {numTokens}),
        desc(DataType::kINT32, {1})};
    PluginTensorDesc outputs[1]{desc(DataType::kFLOAT, {numTokens, hiddenSize})};
    void const* inPtrs[5]{hidden, ids, table, tasks, promptVocabSize};
    void* outPtrs[1]{out};
    auto* run = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    if (run->enqueue(inputs, outputs, inPtrs, outPtrs, nullptr, nullptr) != 0)
    {
        return 7;
    }
    // a table of the wrong width is refused, not read
    inputs[2] = desc(DataType::kFLOAT, {tableRows, hiddenSize + 1});
    if (run->enqueue(inputs, outputs, inPtrs, outPtrs, nullptr, nullptr) == 0)
    {
        return 8;
    }
    return 0;
}

//! createPlugin must refuse a level outside [0, levels).
extern "C" int32_t harness_rejects(int32_t vocabSize, int32_t levels, int32_t level)
{
    auto* creator = static_cast<IPluginCreatorV3One*>(registry().getCreator("DeepstackAdd", "1", "qwen3vl"));
    std::vector<PluginField> fields{{"vocab_size", &vocabSize, PluginFieldType::kINT32, 1},
        {"levels", &levels, PluginFieldType::kINT32, 1}, {"level", &level, PluginFieldType::kINT32, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("deepstack_add", &fc, TensorRTPhase::kBUILD));
    return plugin == nullptr ? 1 : 0;
}
