"""The GPU path: TensorRT-LLM 1.2 checkpoint conversion, engine build and the DeepStack add.

Modules, lightest first:

- `convert`: Hugging Face Qwen3-VL-MoE language model <-> TensorRT-LLM checkpoint
  (`QWenForCausalLM`, `qwen3_moe`, M-RoPE). torch + safetensors only.
- `deepstack`: the DeepStack add as TensorRT-LLM evaluates it in a batch, the plugin's identity,
  the stock-ops graph (written against a small op namespace, so it runs on torch too).
- `build`: engine build settings, the facts the Triton config needs; imports TensorRT-LLM only
  inside `build_engine`.
- `model`: the engine's model definition; imports TensorRT-LLM at import time, so only the build
  imports it.
"""
