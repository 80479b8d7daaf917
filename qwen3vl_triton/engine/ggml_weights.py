"""GGUF weights for the engine's ggml runner: converted from the checkpoint at first start, into
the build folder, and reused while the checkpoint and the settings are unchanged.

The conversion is llama.cpp's own (`convert_hf_to_gguf.py` and its `gguf` package, from the
pinned llama-cpp-python source distribution, through `builders/llamacpp/convert.py`), text model
only: the vision tower stays the project's. Serving dtypes and what they become:

    float32  -> f32 GGUF            (the exact one: fp32 parity with transformers)
    bfloat16 -> bf16 GGUF
    q8_0     -> q8_0 GGUF           (the converter quantizes)
    q4_k     -> Q4_K_M GGUF         (llama.cpp's quantizer, `llama_model_quantize`, from the f32 one)

A converted file is named by the checkpoint, the type and a fingerprint of everything the
conversion reads (`fingerprint`): every file of the checkpoint, the llama.cpp version and the
wrapper's own source. A file with the same name is the same conversion; files
of the same checkpoint and type with another fingerprint are stale and removed. Files are
written beside their final name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONVERTER = ROOT / "builders" / "llamacpp" / "convert.py"
DEFAULT_DIR = ROOT / "build" / "ggml"
LLAMA_CPP_VERSION = "0.3.36"  # builders/llamacpp/build.py pins the same source distribution

# serving dtype -> GGUF type name (the file name's and convert.py's --outtype)
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "q8_0": "q8_0", "q4_k": "q4_k"}


def gguf_type(dtype: str) -> str:
    if dtype not in GGUF_TYPES:
        raise ValueError(f"the ggml runner serves dtype {', '.join(GGUF_TYPES)}; got {dtype!r}")
    return GGUF_TYPES[dtype]


HASHED_BYTES = 64 << 20  # files up to this size count by content, larger ones by size and modification time


def fingerprint(checkpoint: Path, kind: str) -> str:
    """16 hex digits over what the conversion of `checkpoint` to `kind` reads: every file of the
    checkpoint (small ones -- configs, tokenizer, a test checkpoint's weights -- by content, so a
    checkpoint written again with the same bytes is the same; weight files by size and
    modification time, not read whole at every start), the llama.cpp version and the converter."""
    h = hashlib.sha256()
    h.update(json.dumps([LLAMA_CPP_VERSION, kind]).encode())
    if CONVERTER.is_file():
        h.update(CONVERTER.read_bytes())
    for path in sorted(p for p in Path(checkpoint).iterdir() if p.is_file()):
        st = path.stat()
        if st.st_size <= HASHED_BYTES:
            h.update(json.dumps([path.name, hashlib.sha256(path.read_bytes()).hexdigest()]).encode())
        else:
            h.update(json.dumps([path.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def gguf_path(checkpoint: Path, dtype: str, out_dir: Path = DEFAULT_DIR) -> Path:
    kind = gguf_type(dtype)
    checkpoint = Path(checkpoint).resolve()
    return Path(out_dir) / f"{checkpoint.name}-{kind}-{fingerprint(checkpoint, kind)}.gguf"


def ensure_text_gguf(checkpoint: str | Path, dtype: str, out_dir: str | Path | None = None, log=print) -> Path:
    """The text model of `checkpoint` as a GGUF file of `dtype`'s type, converted when missing."""
    checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir or DEFAULT_DIR)
    out = gguf_path(checkpoint, dtype, out_dir)
    if out.is_file():
        log(f"[ggml] weights: {out} (converted before; the checkpoint has not changed)")
        return out
    if not CONVERTER.is_file():
        raise FileNotFoundError(f"{CONVERTER} is missing: the ggml runner converts weights with the project's "
                                f"builders/llamacpp (run from a checkout of the project)")
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = gguf_type(dtype)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    try:
        if kind == "q4_k":  # llama.cpp's quantizer, from the (cached) f32 conversion
            source = ensure_text_gguf(checkpoint, "float32", out_dir, log)
            log(f"[ggml] quantizing {source.name} -> {out.name} (Q4_K_M) ...")
            cmd = [sys.executable, str(CONVERTER), "--quantize", str(source), "--outtype", kind, "--out", str(tmp)]
        else:
            log(f"[ggml] converting {checkpoint} -> {out} (text model, {kind}) ...")
            cmd = [sys.executable, str(CONVERTER), str(checkpoint), "--outtype", kind, "--out", str(tmp)]
        subprocess.run(cmd, check=True)
        if not tmp.is_file():
            raise RuntimeError(f"{' '.join(cmd)} wrote no {tmp}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in out_dir.glob(f"{checkpoint.name}-{kind}-*.gguf"):
        if stale != out:
            stale.unlink(missing_ok=True)
    log(f"[ggml] weights: {out} ({out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return out
