#!/usr/bin/env python3
"""Convert a Hugging Face Qwen3-VL-MoE checkpoint's language model to a TensorRT-LLM checkpoint.

    python builders/trtllm/convert_checkpoint.py --checkpoint /models/Qwen3-VL-30B-A3B-Instruct \
        --output /engines/qwen3vl-ckpt --dtype bfloat16 --max-position-embeddings 32768

The vision tower is not converted: it runs in the `vision_encoder` model.
"""

from __future__ import annotations

import argparse
import sys

from qwen3vl_triton.trtllm.convert import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--output", required=True, help="TensorRT-LLM checkpoint directory to write")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--max-position-embeddings", type=int, default=None,
                    help="rows of the engine's mrope_rotary_cos_sin (default: the model's); >= the engine's "
                         "max_seq_len. Each request sends this many rows x head_dim floats.")
    args = ap.parse_args(argv)
    convert_checkpoint(args.checkpoint, args.output, args.dtype, args.max_position_embeddings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
