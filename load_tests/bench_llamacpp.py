"""llama.cpp as the bench's peer: `llama-server` (builders/llamacpp) on GGUF files converted from
the bench's own checkpoint, driven through its OpenAI endpoint with the bench's workload.

The server runs as llama.cpp users run it for many clients: `-np 8 -cb` (eight parallel slots,
continuous batching), on 127.0.0.1 and a free port, with the threads the served engine takes
(the bench passes serve/cpu_engine.engine_threads: decode `--threads`, prompt `--threads-batch`;
both sides run the same ggml kernels, so the same threads make the comparison one of serving,
not of thread counts; docs/performance.md has llama-server on both threads beside one); it is
started and stopped by its PID. Each request is `/v1/chat/completions`, streamed, the image as a data URL, greedy
(temperature 0), `ignore_eos` with `max_tokens` (so every request yields exactly that many
tokens), no prompt cache (`cache_prompt` false and `--cache-ram 0`: the bench's requests would
otherwise reuse the warm-up's prefix), and `timings_per_token`, whose `predicted_n` says how many
tokens each streamed chunk carries. prefix_ttft.py starts the same server with its prompt cache on
(`cache_ram_mib`) and asks with `cache_prompt` (`messages_body`), to measure a conversation's turns.

llama-server sends a chunk only when the text grows: a token that ends inside a UTF-8 character,
or one that renders as nothing (a special token), arrives with the next chunk. Tokens that
arrive together are spread evenly over the time since the previous chunk (at concurrency 1 it
decodes them back to back), so the inter-token latency reads as its decode step, not as zero
gaps and one long one. The served stack sends every token in its own response.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .bench_report import Sample

SLOTS = 8  # -np: parallel slots, the bench's highest concurrency for the peer
CTX_PER_SLOT = 2048  # tokens per slot (prompt + output), the served stack's max_seq_len in the bench
MODEL_NAME = "qwen3vl"


class PeerError(RuntimeError):
    """llama-server refused a request or failed to start; the message is the server's own."""


# -- the server's command line and the request body (pure) ------------------------------------------------
def server_command(binary: Path, model: Path, mmproj: Path, port: int, threads: int, slots: int = SLOTS,
                   ctx_per_slot: int = CTX_PER_SLOT, threads_batch: int | None = None,
                   cache_ram_mib: int = 0, kv_type: str | None = None,
                   flash_attn: bool | None = None) -> list[str]:
    """llama-server's arguments: the model and its vision projector, `slots` parallel slots with
    continuous batching (the context is split evenly between them), `threads` for decode and
    `threads_batch` (default: the same) for prompt processing, no web UI. `cache_ram_mib`: the
    prompt cache kept in host memory (slots' KV saved for later requests that share a prefix);
    0, the bench's setting, keeps none. `kv_type` (f32, f16, ...) and `flash_attn`: the KV cells
    and the attention (None: llama-server's defaults, f16 cells and flash attention where the
    backend has it)."""
    if cache_ram_mib < 0:
        raise ValueError(f"cache_ram_mib must be >= 0 (a bound), got {cache_ram_mib}")
    cmd = [str(binary), "--model", str(model), "--mmproj", str(mmproj),
           "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(slots), "--cont-batching", "--ctx-size", str(slots * ctx_per_slot),
           "--threads", str(threads), "--threads-batch", str(threads_batch or threads),
           "--cache-ram", str(cache_ram_mib), "--no-webui", "--alias", MODEL_NAME]
    if kv_type is not None:
        cmd += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
    if flash_attn is not None:
        cmd += ["--flash-attn", "on" if flash_attn else "off"]
    return cmd


def peer_kv(outtype: str) -> tuple[str, bool]:
    """llama-server's KV cells and attention for its `outtype` GGUF files: those the served engine
    keeps for the same weights (the dtype whose GGUF type `outtype` is), so the ITL and throughput
    ratios compare the same caches."""
    from qwen3vl_triton.engine.ggml_runner import kv_cells
    from qwen3vl_triton.engine.ggml_weights import GGUF_TYPES

    dtype = next((d for d, t in GGUF_TYPES.items() if t == outtype), None)
    if dtype is None:
        raise ValueError(f"no served dtype has the GGUF type {outtype!r} ({', '.join(GGUF_TYPES.values())})")
    return kv_cells(dtype)


def data_url(image: bytes) -> str:
    """The image as a data URL (PNG or JPEG, by its magic bytes)."""
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif image[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    else:
        raise ValueError("image: expected PNG or JPEG bytes")
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def chat_body(prompt: str, images: list[bytes], max_tokens: int, *, stream: bool = True,
              ignore_eos: bool = True, token_ids: bool = False, cache_prompt: bool = False) -> dict:
    """One chat completion request: the images, then the prompt, in one user message (the order
    the bench's other peers use). `token_ids`: ask for the generated token ids (llama-server lists
    them under `__verbose` with `return_tokens`; its OpenAI answer has no field for them), for
    the greedy check."""
    content = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    content.append({"type": "text", "text": prompt})
    return messages_body([{"role": "user", "content": content}], max_tokens, stream=stream, ignore_eos=ignore_eos,
                         token_ids=token_ids, cache_prompt=cache_prompt)


def messages_body(messages: list[dict], max_tokens: int, *, stream: bool = True, ignore_eos: bool = True,
                  token_ids: bool = False, cache_prompt: bool = False) -> dict:
    """`chat_body` for a whole conversation (OpenAI messages, e.g. `client.Conversation`'s).
    `cache_prompt`: llama-server starts from the KV of the longest prefix its slots (and, with
    `--cache-ram`, its prompt cache) hold; the bench keeps it off."""
    body = {"model": MODEL_NAME, "messages": messages,
            "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
            "ignore_eos": ignore_eos, "cache_prompt": cache_prompt}
    if stream:
        body["timings_per_token"] = True
        body["stream_options"] = {"include_usage": True}
    if token_ids:
        body.update(return_tokens=True, verbose=True)
    return body


@dataclass
class ChatStream:
    """Folds the server-sent events of one streamed chat completion into token arrival times.

    `feed(line, now)` takes each line of the response as it arrives. A chunk's
    `timings.predicted_n` is the number of tokens generated so far; the last of its new tokens
    arrived `now`, and the others are spread evenly since the previous chunk (the first chunk's
    all arrive `now`). Without timings (the role-only first delta), a chunk carries no token.
    `first_content`: when the first chunk with content text arrived (any OpenAI-compatible
    server's stream, timings or not); `cached_tokens` and `prompt_ms`: llama-server's
    `timings.cache_n` and `prompt_ms`, the prompt tokens it took from its cache and the time it
    took to prefill the others."""

    times: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    done: bool = False
    first_content: float | None = None
    cached_tokens: int = 0
    prompt_ms: float | None = None

    def feed(self, line: bytes | str, now: float) -> None:
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if not line.startswith("data:"):
            return  # blank separators, comments, `event:` lines
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            error = chunk["error"]
            raise PeerError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.pieces.append(content)
                if self.first_content is None:
                    self.first_content = now
        timings = chunk.get("timings")
        if timings:
            new = int(timings.get("predicted_n", 0)) - len(self.times)
            if new > 0 and self.times:
                last = self.times[-1]
                self.times.extend(last + (now - last) * (i + 1) / new for i in range(new))
            elif new > 0:
                self.times.extend([now] * new)
            self.prompt_tokens = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
            self.cached_tokens = int(timings.get("cache_n", 0))
            if "prompt_ms" in timings:
                self.prompt_ms = float(timings["prompt_ms"])
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens))
            self.completion_tokens = int(usage.get("completion_tokens", 0))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def sample(self) -> Sample:
        if self.completion_tokens is not None and self.completion_tokens != len(self.times):
            raise PeerError(f"the stream's timings counted {len(self.times)} tokens, its usage "
                            f"{self.completion_tokens}")
        return Sample(self.times[0] if self.times else float("nan"), self.times, self.prompt_tokens)


def response_token_ids(response: dict) -> list[int]:
    """Generated token ids of a non-streamed chat completion asked with `token_ids`."""
    tokens = (response.get("__verbose") or {}).get("tokens")
    if tokens is None:
        raise PeerError("the response has no __verbose.tokens: the server did not return token ids")
    return [int(t) for t in tokens]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the two id lists differ (a length difference counts);
    None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def server_version(binary: Path) -> str:
    """`llama-server --version` on one line (its build number, commit and compiler)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join((out.stdout + out.stderr).split())


# -- the server process --------------------------------------------------------------------------------------
class LlamaServer:
    """One llama-server process, started with `server_command` and stopped by its PID."""

    def __init__(self, binary: Path, model: Path, mmproj: Path, log_file: Path, threads: int | None = None,
                 slots: int = SLOTS, threads_batch: int | None = None, cache_ram_mib: int = 0,
                 kv_type: str | None = None, flash_attn: bool | None = None):
        self.binary, self.model, self.mmproj = Path(binary), Path(model), Path(mmproj)
        self.cache_ram_mib = cache_ram_mib
        self.kv_type, self.flash_attn = kv_type, flash_attn
        self.log_file = Path(log_file)
        self.threads = threads or os.cpu_count() or 1
        self.threads_batch = threads_batch or self.threads
        self.slots = slots
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                tail = deque(f, maxlen=lines)
        except OSError:
            return ""
        return ":\n" + "".join(tail).rstrip() if tail else ""

    def start(self, timeout: float = 300.0, log=print) -> "LlamaServer":
        from qwen3vl_triton.serve.server import free_ports

        (self.port,) = free_ports(1)
        cmd = server_command(self.binary, self.model, self.mmproj, self.port, self.threads, self.slots,
                             threads_batch=self.threads_batch, cache_ram_mib=self.cache_ram_mib,
                             kv_type=self.kv_type, flash_attn=self.flash_attn)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log(f"[bench] starting llama-server ({self.model.name}) on 127.0.0.1:{self.port} ...")
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise PeerError(f"llama-server exited with code {code} while starting{self._log_tail()}")
            if self._healthy():
                log(f"[bench] llama-server ({self.model.name}) ready in {time.perf_counter() - t0:.1f}s")
                return self
            time.sleep(0.25)
        self.stop()
        raise PeerError(f"llama-server was not ready after {timeout:.0f}s{self._log_tail()}")

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection(*self.address, timeout=5)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200  # 503 while the model loads
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process this object started, then SIGKILL if it outlives `timeout`."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# -- the client --------------------------------------------------------------------------------------------------
def _post(conn: http.client.HTTPConnection, body: dict) -> http.client.HTTPResponse:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        text = response.read().decode(errors="replace")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text
        raise PeerError(f"llama-server answered {response.status}: {message}")
    return response


class LlamaCppSession:
    """A client of llama-server; `request` streams one chat completion. Each request opens its
    own HTTP connection (llama-server closes a connection after a streamed answer), as the
    served stack's client opens a gRPC stream per request."""

    def __init__(self, address: tuple[str, int], timeout: float = 600.0):
        self.address, self.timeout = address, timeout
        self.texts: list[str] = []

    def _send(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
        try:
            return conn, _post(conn, body)
        except BaseException:
            conn.close()
            raise

    def request(self, item, max_tokens: int) -> Sample:
        stream = self.stream(chat_body(item.prompt, [item.image], max_tokens))
        self.texts.append(stream.text)
        return stream.sample()

    def stream(self, body: dict) -> ChatStream:
        """One streamed chat completion of `body`, read to its end; times in seconds since the
        request was sent. Any OpenAI-compatible endpoint at `address` answers it."""
        t0 = time.perf_counter()
        conn, response = self._send(body)
        try:
            stream = ChatStream()
            while not stream.done:
                line = response.readline()
                if not line:
                    break
                stream.feed(line, time.perf_counter() - t0)
        finally:
            conn.close()
        return stream

    def token_ids(self, prompt: str, images: list[bytes], max_tokens: int) -> tuple[list[int], int]:
        """Greedy token ids, exactly `max_tokens` of them (`ignore_eos`), and the prompt's length,
        for the check against the oracle."""
        conn, response = self._send(chat_body(prompt, images, max_tokens, stream=False, token_ids=True))
        try:
            answer = json.loads(response.read())
        finally:
            conn.close()
        return response_token_ids(answer), int(answer.get("usage", {}).get("prompt_tokens", 0))

    def close(self):
        pass


def oracle_ids(oracle, prompt: str, images: list[bytes], max_tokens: int) -> list[int]:
    """transformers' greedy ids for exactly `max_tokens` tokens: the end ids (the tokenizer's end
    of turn and generation_config.json's eos ids, the tokens llama.cpp counts as end of
    generation) are suppressed, as `ignore_eos` does on llama-server (a -inf logit bias)."""
    import torch

    eos = oracle.model.generation_config.eos_token_id
    end_ids = sorted({oracle.end_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])})
    inp = oracle.inputs(prompt, images)
    with torch.inference_mode():
        out = oracle.model.generate(**inp.kwargs(), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                    do_sample=False, eos_token_id=end_ids, pad_token_id=oracle.end_id)
    return out[0, inp.input_ids.shape[1]:].tolist()


def greedy_check(session: LlamaCppSession, oracle, prompt: str, images: list[bytes], max_tokens: int) -> dict:
    """llama.cpp's greedy ids against transformers' (the oracle) for the same request, both for
    exactly `max_tokens` tokens with the end ids suppressed (a text prompt of the tiny model
    would otherwise end after a few tokens): equal token for token, or the index of the first
    difference; with both sides' prompt lengths."""
    ids, prompt_tokens = session.token_ids(prompt, images, max_tokens)
    expected = oracle_ids(oracle, prompt, images, max_tokens)
    diff = first_difference(ids, expected)
    return {
        "equal": diff is None,
        "first_difference": diff,
        "tokens": len(expected),
        "prompt_tokens": prompt_tokens,
        "oracle_prompt_tokens": int(oracle.inputs(prompt, images).input_ids.shape[1]),
    }
