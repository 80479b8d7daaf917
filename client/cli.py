"""python -m client: stream a generation from the server, single or disaggregated.

    python -m client generate --url 127.0.0.1:8001 --image sample.png --prompt "Describe it." --max-tokens 64 --stats
    python -m client generate --url 127.0.0.1:8000 --protocol http --prompt "Hello" --no-stream
    python -m client disagg --encoder-url 127.0.0.1:8101 --language-url 127.0.0.1:8201 --transport grpc \\
        --image sample.png --prompt "Describe it." --max-tokens 64
    python -m client generate --messages chat.json --prompt "And the colours?" --save chat.json

A conversation: --messages FILE.json holds OpenAI chat messages; --prompt (and --image) add a
user turn to it, and --save FILE.json writes the conversation with the reply appended, so the
next call continues it. A --messages file that does not exist yet is a new conversation, and so
is --save without --messages.

Text goes to stdout as it arrives; --stats adds TTFT, inter-token latency and tokens/s on stderr.
Any failure (server down, model not ready, a refused input) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from qwen3vl_triton.errors import message_of

from .api import Client, ClientError, Conversation, GenerationStats

EXIT_ERROR = 1
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


class CliError(Exception):
    """A failure reported as one line, without a traceback."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _read_images(paths: list[str], kind: str = "image") -> list[bytes]:
    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CliError(f"{kind} {p}: no such file")
        images.append(path.read_bytes())
    return images


def _conversation(args, images: list[bytes], videos: list[bytes] = ()) -> Conversation | None:
    """The conversation of --messages, with --prompt/--image/--video as a new user turn; None without
    --messages and --save (a plain generation). A --messages file that does not exist yet, or
    --save alone, starts a new conversation."""
    if args.messages is None and args.save is None:
        if args.prompt is None:
            raise CliError("give --prompt, or --messages FILE.json")
        return None
    path = Path(args.messages) if args.messages is not None else None
    if path is None or not path.exists():
        if args.prompt is None:
            what = f"--messages {args.messages}: no such file yet" if path is not None else "--save alone"
            raise CliError(f"{what}: give --prompt to start the conversation")
        messages = []
    else:
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CliError(f"--messages {args.messages}: {exc}") from None
    if not isinstance(messages, list):
        raise CliError(f"--messages {args.messages}: must hold a JSON array of chat messages")
    conv = Conversation(messages)
    if args.prompt is not None:
        conv.user(args.prompt, images, videos)
    elif images or videos:
        raise CliError("--image and --video add to a new turn: give --prompt with them")
    return conv


def _save(args, conv: Conversation | None, reply: str) -> None:
    if conv is not None and args.save:
        conv.assistant(reply)
        Path(args.save).write_text(json.dumps(conv.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Tee:
    """Writes to `out` and keeps the text (the reply to save)."""

    def __init__(self, out):
        self.out, self.parts = out, []

    def write(self, text):
        self.parts.append(text)
        self.out.write(text)

    def flush(self):
        self.out.flush()

    @property
    def text(self) -> str:
        return "".join(self.parts).removesuffix("\n")


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def format_stats(stats: GenerationStats, tokens: int) -> str:
    """TTFT, inter-token latency and tokens/s of one generation, as printed by --stats.

    `tokens` counts streamed responses: the server sends one per generated token (a response whose
    token ends inside a UTF-8 character carries no text, so it adds no inter-token sample)."""
    lines = [f"tokens: {tokens}   total: {stats.total * 1000:.1f} ms"]
    lines.append("TTFT: " + ("n/a" if stats.ttft is None else f"{stats.ttft * 1000:.1f} ms"))
    itl = np.asarray(stats.inter_token) * 1000
    if itl.size:
        p50, p90, p99 = np.percentile(itl, [50, 90, 99])
        lines.append(f"inter-token latency: mean {itl.mean():.1f} ms, p50 {p50:.1f}, p90 {p90:.1f}, "
                     f"p99 {p99:.1f}, max {itl.max():.1f} ({itl.size} gaps)")
    else:
        lines.append("inter-token latency: n/a (fewer than two streamed pieces)")
    lines.append(f"tokens/s: {tokens / stats.total:.1f}" if stats.total > 0 else "tokens/s: n/a")
    if stats.first is not None and stats.end is not None and tokens > 1 and stats.end > stats.first:
        lines[-1] += f" (decode after the first token: {(tokens - 1) / (stats.end - stats.first):.1f})"
    return "\n".join(lines)


def _emit(pieces, stats: GenerationStats | None, out) -> int:
    """Write pieces as they arrive; return how many responses came."""
    count = 0
    for piece in pieces:
        count += 1
        if stats is not None:
            stats.mark(piece)
        out.write(piece)
        out.flush()
    if stats is not None:
        stats.end = time.perf_counter()
    out.write("\n")
    out.flush()
    return count


def cmd_generate(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    url = args.url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"
    images, videos = _read_images(args.image), _read_images(args.video, "video")
    conv = _conversation(args, images, videos)
    tee = _Tee(out)
    with Client(url, args.protocol, model=args.model, timeout=args.timeout) as client:
        client.check_ready()
        stats = GenerationStats() if args.stats else None  # times the request, not the readiness check
        if conv is not None:
            pieces = client.chat(conv.messages, args.max_tokens, stream=not args.no_stream, **_sampling(args))
        else:
            pieces = client.generate(args.prompt, images, args.max_tokens, stream=not args.no_stream,
                                     videos=videos, **_sampling(args))
        tokens = _emit(pieces, stats, tee)
    _save(args, conv, tee.text)
    if stats is not None:
        if args.no_stream:
            print(f"total: {stats.total * 1000:.1f} ms (--no-stream: the text comes in one response, so there is "
                  f"no TTFT, inter-token latency or token count)", file=err)
        else:
            print(format_stats(stats, tokens), file=err)
    return 0


def cmd_disagg(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from qwen3vl_triton.transfer.sender import Disaggregated, TransferError

    images, videos = _read_images(args.image), _read_images(args.video, "video")
    conv = _conversation(args, images, videos)
    tee = _Tee(out)
    # one clear message for a server that is down or a model that is not loaded, before any work
    for url, model in ((args.encoder_url, "encode"), (args.language_url, "language")):
        with Client(url, "grpc", model=model, timeout=args.timeout) as probe:
            probe.check_ready()
    try:
        with Disaggregated(args.encoder_url, args.language_url, transport=args.transport,
                           chunk_rows=args.chunk_rows, chunk_window=args.chunk_window, timeout=args.timeout) as dis:
            stats = GenerationStats() if args.stats else None
            pieces = (dis.generate(messages=conv.messages, max_tokens=args.max_tokens, **_sampling(args))
                      if conv is not None else dis.generate(args.prompt, images, args.max_tokens, videos=videos,
                                                            **_sampling(args)))
            tokens = _emit(pieces, stats, tee)
            moved = dis.stats
    except TransferError as exc:
        raise CliError(str(exc)) from None
    _save(args, conv, tee.text)
    if stats is not None:
        print(format_stats(stats, tokens), file=err)
        print(f"table transfer ({args.transport}): {moved.rows} rows in {moved.chunks} chunks, "
              f"{moved.payload_bytes / 2**20:.2f} MiB, {moved.seconds * 1000:.1f} ms, {moved.resumes} resumes",
              file=err)
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="image file(s), in prompt order (repeat the flag or list several)")
    p.add_argument("--video", action="extend", nargs="+", default=[], metavar="PATH",
                   help="video file(s) (MP4, ...), after the images, in prompt order")
    p.add_argument("--prompt", help="the user prompt (the server applies the chat template)")
    p.add_argument("--messages", metavar="FILE.json", help="a conversation (OpenAI chat messages); --prompt and "
                                                           "--image/--video add a user turn to it")
    p.add_argument("--save", metavar="FILE.json", help="write the conversation with the reply appended (to "
                                                       "continue it with --messages)")
    p.add_argument("--max-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stats", action="store_true", help="print TTFT, inter-token latency and tokens/s to stderr")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a response")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="single server: the qwen3vl ensemble over gRPC or HTTP")
    g.add_argument("--url", help="HOST:PORT of the gRPC or HTTP endpoint (default 127.0.0.1:8001 for grpc, "
                                 ":8000 for http)")
    g.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    g.add_argument("--model", default="qwen3vl")
    g.add_argument("--no-stream", action="store_true", help="ask for the whole text in one response")
    _common(g)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("disagg", help="disaggregated: encode on one server, generate on another")
    d.add_argument("--encoder-url", required=True, help="HOST:PORT (gRPC) of the encoder server")
    d.add_argument("--language-url", required=True, help="HOST:PORT (gRPC) of the language server")
    d.add_argument("--transport", choices=["grpc", "shm"], default="grpc",
                   help="grpc: table chunks as tensor payloads; shm: system shared memory (co-located servers)")
    d.add_argument("--chunk-rows", type=_positive, default=1024, help="table rows per chunk")
    d.add_argument("--chunk-window", type=_positive, default=4, help="chunks in flight at once")
    _common(d)
    d.set_defaults(func=cmd_disagg)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ClientError, CliError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- a library or network failure: one line, never a traceback
        print(f"error: {type(exc).__name__}: {_one_line(message_of(exc))}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
