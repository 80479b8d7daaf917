"""Load tests, benchmarks and the soak of the served stack: Locust users and their bounded runner,
the bench against transformers and llama.cpp, and the tools the benchmarks' figures come from."""

import sys


def run_tool(main) -> int:
    """A tool's entry point: a checkpoint it cannot read (missing, or one the engines cannot serve)
    is one line that says how to make one, never a traceback."""
    from qwen3vl_triton.model.checkpoint import CheckpointError

    try:
        return main()
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
