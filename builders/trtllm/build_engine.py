#!/usr/bin/env python3
"""Build the TensorRT-LLM engine (Qwen3-VL-MoE language model with DeepStack) from a converted checkpoint.

    python builders/trtllm/build_engine.py --checkpoint /engines/qwen3vl-ckpt --output /engines/qwen3vl \
        --max-batch-size 8 --max-image-tokens 1024 --deepstack-impl plugin \
        --plugin-library builders/plugin/build/libqwen3vl_deepstack_plugin.so

Every request's prompt table must then be packed with stride --max-image-tokens (S): [4S, H].
"""

from __future__ import annotations

import argparse
import sys

from qwen3vl_triton.trtllm.build import EngineSettings, build_engine
from qwen3vl_triton.trtllm.deepstack import IMPLEMENTATIONS


def main(argv: list[str] | None = None) -> int:
    defaults = EngineSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="TensorRT-LLM checkpoint (convert_checkpoint.py)")
    ap.add_argument("--output", required=True, help="engine directory to write")
    ap.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    ap.add_argument("--max-image-tokens", type=int, default=defaults.max_image_tokens,
                    help="image tokens per request (all its images): the prompt-table stride S")
    ap.add_argument("--max-input-len", type=int, default=defaults.max_input_len)
    ap.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    ap.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens)
    ap.add_argument("--deepstack-impl", choices=IMPLEMENTATIONS, default=defaults.deepstack_impl,
                    help="plugin: the DeepstackAdd TensorRT plugin; stock: TensorRT-LLM gather/where ops")
    ap.add_argument("--plugin-library", default=None, help="libqwen3vl_deepstack_plugin.so (default: "
                    "builders/plugin/build/)")
    ap.add_argument("--gather-context-logits", action="store_true")
    args = ap.parse_args(argv)
    settings = EngineSettings(
        max_batch_size=args.max_batch_size, max_image_tokens=args.max_image_tokens,
        max_input_len=args.max_input_len, max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
        deepstack_impl=args.deepstack_impl, gather_context_logits=args.gather_context_logits)
    build_engine(args.checkpoint, args.output, settings, args.plugin_library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
