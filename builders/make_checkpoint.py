#!/usr/bin/env python3
"""Write a tiny (tests) or small (benchmarks) Qwen3-VL-MoE checkpoint in Hugging Face format.

    python builders/make_checkpoint.py --profile tiny --out checkpoints/tiny

Same profile and seed -> the same bytes. See qwen3vl_triton/model/tiny.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen3vl_triton.model.tiny import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
