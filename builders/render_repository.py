#!/usr/bin/env python3
"""Render model_repository/ for a checkpoint and a device into a servable Triton model repository.

    python builders/render_repository.py --checkpoint checkpoints/tiny --out build/repository/all
    python builders/render_repository.py --checkpoint /models/Qwen3-VL-30B-A3B-Instruct --device gpu \\
        --engine-dir /engines/qwen3vl --topology single --out /repository

Fails on any placeholder without a value, an inconsistent setting, or a config Triton cannot
parse. `qwen3vl-serve` renders the same way before it starts the server.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen3vl_triton.model.checkpoint import CheckpointError  # noqa: E402
from qwen3vl_triton.serve.launcher import settings_from  # noqa: E402
from qwen3vl_triton.serve.repository import TOPOLOGIES, RenderError, render  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="repository directory to write (replaced)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--engine-dir", help="TensorRT-LLM engine (device gpu)")
    ap.add_argument("--topology", choices=sorted(TOPOLOGIES), default="all")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a serving setting")
    args = ap.parse_args(argv)
    try:
        repo = render(args.checkpoint, args.out, device=args.device, topology=args.topology,
                      settings=settings_from(args.set), engine_dir=args.engine_dir)
    except (RenderError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {', '.join(sorted(p.name for p in repo.iterdir()))} into {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
