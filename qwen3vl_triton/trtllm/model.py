"""The Qwen3-VL-MoE language model for TensorRT-LLM 1.2's engine flow.

TensorRT-LLM's `QWenForCausalLM` (qwen3_moe) with three changes:

- the decoder loop adds DeepStack level k after global layer k (after the whole layer, residual
  included, as transformers' Qwen3VLMoeTextModel does), reading the row-stacked prompt table
  through the same `tasks` / `prompt_vocab_size` addressing as `PromptTuningEmbedding`;
- M-RoPE inputs (`mrope_rotary_cos_sin`, `mrope_position_deltas`) are declared for this
  architecture too (TensorRT-LLM's builder declares them only for Qwen2-VL);
- `mlp_only_layers` get a dense GatedMLP, and the q/k norms use the model's epsilon.

Importing this module imports TensorRT-LLM; `build.build_engine` is the only importer.
"""

from __future__ import annotations

import copy

import numpy as np
import tensorrt as trt
import tensorrt_llm.functional as F
from tensorrt_llm._common import default_net, default_trtnet
from tensorrt_llm.functional import PositionEmbeddingType, Tensor, _create_tensor, constant, expand, shape
from tensorrt_llm.layers import GatedMLP
from tensorrt_llm.models.modeling_utils import DecoderLayerList
from tensorrt_llm.models.qwen.model import QWenDecoderLayer, QWenForCausalLM, QWenModel

from qwen3vl_triton.trtllm.deepstack import (
    PLUGIN_FIELDS,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    deepstack_add_graph,
    local_rows,
)


def _is_moe_layer(config, layer_idx: int) -> bool:
    return (layer_idx not in getattr(config, "mlp_only_layers", [])
            and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class DeepstackAdd:
    """Adds DeepStack level k to the hidden states after global decoder layer k (k < levels)."""

    def __init__(self, config, input_ids: Tensor, table: Tensor, tasks: Tensor, prompt_vocab_size: Tensor):
        self.impl = config.deepstack_impl
        self.levels = config.deepstack_levels
        self.vocab_size = config.vocab_size
        self.stride = config.deepstack_stride
        self.input_ids, self.table, self.prompt_vocab_size = input_ids, table, prompt_vocab_size
        self.tasks = expand(tasks, shape(input_ids))  # one slot per token, as PromptTuningEmbedding does

    def __call__(self, hidden_states: Tensor, layer_idx: int) -> Tensor:
        if layer_idx >= self.levels:
            return hidden_states
        if self.impl == "plugin":
            return self._plugin(hidden_states, layer_idx)
        rows = constant(local_rows((self.levels + 1) * self.stride, self.levels, layer_idx))
        return deepstack_add_graph(F, hidden_states, self.input_ids, self.table, self.tasks, self.prompt_vocab_size,
                                   rows, self.vocab_size)

    def _plugin(self, hidden_states: Tensor, level: int) -> Tensor:
        creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        if creator is None:
            raise RuntimeError(f"TensorRT plugin {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION} is not "
                               "registered: load its library first (build.load_plugin_library)")
        values = dict(zip(PLUGIN_FIELDS, (self.vocab_size, self.levels, level)))
        fields = trt.PluginFieldCollection([
            trt.PluginField(name, np.array([value], dtype=np.int32), trt.PluginFieldType.INT32)
            for name, value in values.items()])
        plugin = creator.create_plugin(f"deepstack_add_{level}", fields, trt.TensorRTPhase.BUILD)
        inputs = [hidden_states, self.input_ids, self.table, self.tasks, self.prompt_vocab_size]
        layer = default_trtnet().add_plugin_v3([t.trt_tensor for t in inputs], [], plugin)
        return _create_tensor(layer.get_output(0), layer)


class Qwen3VLDecoderLayer(QWenDecoderLayer):

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        # TensorRT-LLM's Attention builds the q/k RmsNorms with its default eps (1e-5); Qwen3 uses
        # the model's rms_norm_eps.
        for norm in (self.attention.q_layernorm, self.attention.k_layernorm):
            norm.eps = config.norm_epsilon
        if not _is_moe_layer(config, layer_idx):
            self.mlp = GatedMLP(hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
                                hidden_act="silu", dtype=config.dtype, bias=config.mlp_bias,
                                tp_group=config.mapping.tp_group, tp_size=config.mapping.tp_size,
                                quant_mode=config.quant_mode)


class Qwen3VLDecoderLayerList(DecoderLayerList):
    """DecoderLayerList whose loop adds DeepStack after each of the first `levels` global layers."""

    def forward(self, hidden_states, use_cache=False, attention_mask=None, kv_cache_params=None,
                attention_params=None, mrope_params=None, lora_params=None, spec_decoding_params=None,
                deepstack: DeepstackAdd | None = None):
        plugin_config = default_net().plugin_config
        if getattr(plugin_config, "reduce_fusion", False) or getattr(plugin_config, "norm_quant_fusion", False):
            raise NotImplementedError("reduce_fusion / norm_quant_fusion fuse across layer boundaries, where "
                                      "the DeepStack add sits")
        kv_cache_params.fill_none_tensor_list(len(self.layer_list))
        presents = []
        for local_idx, (layer, past) in enumerate(zip(self, kv_cache_params.past_key_value)):
            kwargs = {}
            if lora_params is not None and lora_params.lora_ranks is not None:
                kwargs["lora_layer_params"] = lora_params.get_layer_params(local_idx)
            if spec_decoding_params is not None:
                kwargs["spec_decoding_params"] = spec_decoding_params
            if mrope_params is not None:
                kwargs["mrope_params"] = mrope_params
            layer_kv = copy.copy(kv_cache_params)  # the shared cache inputs, with this layer's past
            layer_kv.past_key_value = [past]
            out = layer(hidden_states, use_cache=use_cache, attention_mask=attention_mask,
                        kv_cache_params=layer_kv, attention_params=attention_params, **kwargs)
            if use_cache:
                hidden_states, present = out
                presents.append(present)
            else:
                hidden_states = out
            if deepstack is not None:
                hidden_states = deepstack(hidden_states, self.layer_list[local_idx])
        return (hidden_states, presents) if use_cache else hidden_states


class Qwen3VLModel(QWenModel):

    def __init__(self, config):
        super().__init__(config)
        if config.mapping.pp_size != 1:
            raise NotImplementedError("pipeline parallelism: the DeepStack layers need the prompt table")
        self.config = config
        self.layers = Qwen3VLDecoderLayerList(Qwen3VLDecoderLayer, config)

    def forward(self, input_ids: Tensor, position_ids=None, use_cache=False, spec_decoding_params=None,
                attention_mask=None, kv_cache_params=None, attention_params=None, mrope_params=None,
                hidden_states=None, prompt_embedding_table: Tensor | None = None,
                prompt_tasks: Tensor | None = None, prompt_vocab_size: Tensor | None = None, lora_params=None):
        deepstack = None
        if prompt_embedding_table is not None:
            hidden_states = self.vocab_embedding(input_ids, prompt_embedding_table, prompt_tasks, prompt_vocab_size)
            if self.config.deepstack_levels:
                deepstack = DeepstackAdd(self.config, input_ids, prompt_embedding_table, prompt_tasks,
                                         prompt_vocab_size)
        else:
            hidden_states = self.vocab_embedding(input_ids)
        hidden_states = self.layers.forward(
            hidden_states, use_cache=use_cache, attention_mask=attention_mask, kv_cache_params=kv_cache_params,
            attention_params=attention_params, mrope_params=mrope_params, lora_params=lora_params,
            spec_decoding_params=spec_decoding_params, deepstack=deepstack)
        if use_cache:
            hidden_states, presents = hidden_states
        hidden_states = self.ln_f(hidden_states)
        return (hidden_states, tuple(presents)) if use_cache else hidden_states


class Qwen3VLForCausalLM(QWenForCausalLM):
    """`QWenForCausalLM` with the Qwen3-VL decoder; the engine's architecture stays QWenForCausalLM."""

    def __init__(self, config):
        for name in ("deepstack_levels", "deepstack_impl", "deepstack_stride"):
            if not hasattr(config, name):
                raise ValueError(f"config has no {name}: convert with qwen3vl_triton.trtllm.convert and build "
                                 "with qwen3vl_triton.trtllm.build")
        super().__init__(config)
        self.transformer = Qwen3VLModel(config)

    def prepare_inputs(self, *args, **kwargs):
        if self.config.position_embedding_type == PositionEmbeddingType.mrope:
            # [batch, max_position_embeddings * rotary_dim] float32 (cos, sin) pairs, as for Qwen2-VL
            kwargs.setdefault("mrope_rotary_cos_sin_size",
                              self.config.max_position_embeddings * self.config.rotary_embedding_dim)
        return super().prepare_inputs(*args, **kwargs)
