"""GGUF files for llama.cpp from a Hugging Face checkpoint of this project, with the converter
of the same llama.cpp tree that build.py builds (its `convert_hf_to_gguf.py` and `gguf-py`).

    python builders/llamacpp/convert.py checkpoints/small --outtype f32
    -> build/llamacpp/gguf/small-f32.gguf (the language model) and small-f32-mmproj.gguf (the vision tower)
    python builders/llamacpp/convert.py --quantize small-f32.gguf --outtype q4_k --out small-q4_k.gguf

Types: f32 and bf16 (the converter writes them), q8_0 (the converter quantizes the language model;
the vision tower stays f16/f32 as the converter decides), q4_k (Q4_K_M: llama.cpp's quantizer,
`llama_model_quantize` through llama-cpp-python's C API -- no other binary is built -- from an
f32 conversion; the vision tower of a q4_k pair is the f32 one's).

The converter names a BPE tokenizer's pre-tokenizer by the hash of its tokens for a fixed text
and gives up on a hash it does not know. A tokenizer trained for a checkpoint (tiny.py) has a
hash of its own, so when the hash is unknown and the checkpoint's tokenizer.json declares GPT-2's
pre-tokenizer (ByteLevel with its regex, nothing else), the wrapper names it "gpt-2", the
pre-tokenizer llama.cpp implements for that regex. Any other unknown tokenizer still fails, as it
does upstream. The llama.cpp tree is not modified: the wrapper imports the converter and
replaces that one method.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
from builders.llamacpp import build as llamacpp_build  # noqa: E402

GGUF_DIR = llamacpp_build.BUILD / "gguf"
OUTTYPES = ("f32", "bf16", "q8_0", "q4_k")
QUANTIZED = {"q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # types llama.cpp's quantizer writes (from f32)


def gpt2_pre_tokenizer(tokenizer_json: dict) -> bool:
    """True when the tokenizer splits text exactly as GPT-2 does: a ByteLevel pre-tokenizer with
    its regex, alone or as the only step of a Sequence."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return (len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True)
            and tokenizer_json.get("model", {}).get("type") == "BPE")


def outputs(checkpoint: Path, outtype: str, out_dir: Path = GGUF_DIR) -> tuple[Path, Path]:
    """(language model, vision projector) GGUF paths of `checkpoint` at `outtype`."""
    stem = f"{Path(checkpoint).name}-{outtype}"
    return out_dir / f"{stem}.gguf", out_dir / f"{stem}-mmproj.gguf"


def _patch_pre_tokenizer(checkpoint: Path) -> None:
    from conversion import base  # the converter's package, importable once the tree is on sys.path

    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if gpt2_pre_tokenizer(tokenizer_json):
                base.logger.info("pre-tokenizer hash unknown; tokenizer.json declares GPT-2's ByteLevel "
                                 "pre-tokenizer: using 'gpt-2'")
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def convert(checkpoint: Path, outtype: str, mmproj: bool, out: Path, tree: Path | None = None) -> Path:
    """Run the tree's convert_hf_to_gguf.py in this process (once per process: it configures
    logging and its module state)."""
    tree = tree or llamacpp_build.fetch_source()
    for path in (tree / "gguf-py", tree):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    _patch_pre_tokenizer(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(tree / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", outtype, "--outfile", str(out)]
    if mmproj:
        argv.append("--mmproj")
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = saved
    if not out.is_file():
        raise SystemExit(f"the converter wrote no {out}")
    return out


def quantize(source: Path, out: Path, outtype: str, threads: int | None = None) -> Path:
    """`source` (an f32 or bf16 GGUF) quantized to `outtype` by llama.cpp's quantizer, in this process."""
    import ctypes

    import llama_cpp

    # llama.cpp logs a line per tensor ("[  12/ 579] blk.0.attn_q.weight ..."): keep its warnings and
    # errors (levels 3, 4; 5 continues a line), and show progress every tenth of the tensors
    last, shown = [0], [-1]
    counter = re.compile(rb"^\[\s*(\d+)/\s*(\d+)\]")

    @llama_cpp.llama_log_callback
    def keep_warnings(level, text, _user):
        last[0] = last[0] if level == 5 else level
        if last[0] in (3, 4) and text:
            sys.stderr.write(text.decode(errors="replace"))
        m = counter.match(text or b"") if level == 2 else None
        if m and (tenth := 10 * int(m[1]) // int(m[2])) > shown[0]:
            shown[0] = tenth
            print(f"[llamacpp] quantizing to {outtype}: tensor {int(m[1])} of {int(m[2])}", flush=True)

    llama_cpp.llama_log_set(keep_warnings, ctypes.c_void_p())
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[outtype])
    params.nthread = threads or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise SystemExit(f"llama_model_quantize({source} -> {out}, {outtype}) failed: {rc}")
    print(f"[llamacpp] {source.name} ({source.stat().st_size / 2**20:.1f} MiB) quantized to {outtype}: {out.name} "
          f"({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return out


def convert_any(checkpoint: Path, outtype: str, mmproj: bool, out: Path) -> Path:
    """`convert`, and for a quantizer type an f32 conversion beside `out` quantized into it."""
    if outtype not in QUANTIZED:
        return convert(checkpoint, outtype, mmproj, out)
    f32 = out.with_name(out.name + ".f32.tmp")
    try:
        convert(checkpoint, "f32", mmproj, f32)
        if mmproj:  # the quantizer is for language models; the vision tower stays f32
            f32.rename(out)
            return out
        return quantize(f32, out, outtype)
    finally:
        f32.unlink(missing_ok=True)


def ensure_gguf(checkpoint: Path, outtype: str, out_dir: Path = GGUF_DIR, log=print) -> tuple[Path, Path]:
    """Both GGUF files of `checkpoint` at `outtype`, converted (each in its own process) when
    missing or older than the checkpoint's weights."""
    import subprocess

    checkpoint = Path(checkpoint)
    weights = max(p.stat().st_mtime for p in checkpoint.glob("*.safetensors"))
    paths = outputs(checkpoint, outtype, out_dir)
    for path, mmproj in zip(paths, (False, True)):
        if path.is_file() and path.stat().st_mtime >= weights:
            continue
        log(f"[llamacpp] converting {checkpoint} -> {path.name} ...")
        cmd = [sys.executable, __file__, str(checkpoint), "--outtype", outtype, "--out", str(path)]
        if mmproj:
            cmd.append("--mmproj")
        subprocess.run(cmd, check=True)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, nargs="?")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f32")
    ap.add_argument("--quantize", type=Path, metavar="GGUF",
                    help=f"quantize this f32/bf16 GGUF to --outtype ({', '.join(QUANTIZED)}) into --out")
    ap.add_argument("--mmproj", action="store_true", help="one file: the vision projector (with --out)")
    ap.add_argument("--out", type=Path, help="one file's path; without it, both files under build/llamacpp/gguf")
    args = ap.parse_args(argv)
    if args.quantize is not None:
        if args.outtype not in QUANTIZED or args.out is None:
            ap.error(f"--quantize needs --outtype {'/'.join(QUANTIZED)} and --out")
        quantize(args.quantize, args.out, args.outtype)
    elif args.checkpoint is None:
        ap.error("a checkpoint (or --quantize GGUF) is needed")
    elif args.out is not None:
        convert_any(args.checkpoint, args.outtype, args.mmproj, args.out)
    else:
        for path in ensure_gguf(args.checkpoint, args.outtype):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
