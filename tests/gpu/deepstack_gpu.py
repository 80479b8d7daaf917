"""The DeepstackAdd CUDA kernel on a device, against torch (part 1 of tests/gpu/device_check.sh).

builders/plugin/src/deepstack_kernel.cu and the C entry point builders/plugin/test/deepstack_capi.cu
are built with nvcc into one shared library, called through ctypes on torch's device tensors, and
compared with `reference`: the batched DeepStack add of docs/design.md §3 as TensorRT-LLM's runtime
lays the batch out (request b's row-stacked table at rows [b P, (b + 1) P), `tasks[t]` the slot of
token t; fake id vocab + j of a slot reads row b P + (level + 1) S + j; text ids, prompt-table ids
past the image block and slots past the table add nothing). The row of each token comes from
qwen3vl_triton.model.table.deepstack_row, the one statement of the indexing; the add is torch's
elementwise add in the tensor's dtype, which computes in float and rounds once, as the kernel does
(deepstack_add.h: addToken) -- so every dtype must match bit for bit.

    python -m tests.gpu.deepstack_gpu build --out DIR            -> DIR/libdeepstack_capi.so
    python -m tests.gpu.deepstack_gpu check --lib LIB --report kernel.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3vl_triton.model.table import deepstack_row

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "builders" / "plugin"
LIBRARY = "libdeepstack_capi.so"
ELEMENT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # deepstack_kernel.h ElementType


def nvcc_command(out: Path, arch: str = "90") -> list[str]:
    """The one nvcc command: the kernel and its C entry point for sm_<arch> (SASS, and PTX of the
    same arch for the driver to JIT if the device is newer), the CUDA runtime linked statically.
    Warnings are not errors here (tests/test_trtllm_plugin.py holds the kernel to that): a newer
    host compiler's warning on the device must not cost the run."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return [nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-gencode=arch=compute_{arch},code=compute_{arch}", "-Xcompiler", "-fPIC",
            "-shared", "-I", str(PLUGIN / "include"), "-I", str(PLUGIN / "src"),
            str(PLUGIN / "src" / "deepstack_kernel.cu"), str(PLUGIN / "test" / "deepstack_capi.cu"), "-o", str(out)]


def build_library(out_dir: str | Path, arch: str = "90", timeout: float = 300) -> Path:
    out = Path(out_dir) / LIBRARY
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = nvcc_command(out, arch)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return out


class Kernel:
    """The built library: `add` launches the kernel on torch tensors on torch's current stream."""

    def __init__(self, path: str | Path):
        self.lib = ctypes.CDLL(str(path))
        i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
        self.lib.qwen3vl_deepstack_launch.restype = ctypes.c_int
        self.lib.qwen3vl_deepstack_launch.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i64, i32, i32, i32,
                                                      ptr]
        self.lib.qwen3vl_deepstack_error_name.restype = ctypes.c_char_p
        self.lib.qwen3vl_deepstack_error_name.argtypes = [ctypes.c_int]
        self.lib.qwen3vl_deepstack_sync.restype = ctypes.c_int
        self.lib.qwen3vl_deepstack_sync.argtypes = [ptr]

    def error_name(self, code: int) -> str:
        return self.lib.qwen3vl_deepstack_error_name(code).decode()

    def launch(self, out, hidden, ids, tasks, table, prompt_vocab_size, vocab: int, levels: int, level: int,
               stream: int | None = None) -> int:
        """The launch's cudaError_t (0: launched). No checks of the tensors here: `add` does them."""
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream if hidden.is_cuda else 0
        return self.lib.qwen3vl_deepstack_launch(
            ELEMENT_TYPES[hidden.dtype], out.data_ptr(), hidden.data_ptr(), ids.data_ptr(), tasks.data_ptr(),
            table.data_ptr(), prompt_vocab_size.data_ptr(), hidden.shape[0], hidden.shape[1], table.shape[0], vocab,
            levels, level, stream)

    def add(self, hidden, ids, tasks, table, prompt_vocab_size, vocab: int, levels: int, level: int, out=None):
        """out (a new tensor unless given; it may be `hidden`) = hidden + DeepStack level `level`."""
        for name, t, dtype in (("ids", ids, torch.int32), ("tasks", tasks, torch.int32),
                               ("prompt_vocab_size", prompt_vocab_size, torch.int32), ("table", table, hidden.dtype)):
            if t.dtype != dtype or t.device != hidden.device or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {dtype} tensor on {hidden.device}")
        if hidden.dim() != 2 or table.dim() != 2 or table.shape[1] != hidden.shape[1] or not hidden.is_contiguous():
            raise ValueError(f"hidden [T, H] and table [rows, H] expected, got {tuple(hidden.shape)}, "
                             f"{tuple(table.shape)}")
        if ids.numel() != hidden.shape[0] or tasks.numel() != hidden.shape[0]:
            raise ValueError("ids and tasks need one entry per token")
        out = torch.empty_like(hidden) if out is None else out
        code = self.launch(out, hidden, ids, tasks, table, prompt_vocab_size, vocab, levels, level)
        if code:
            raise RuntimeError(f"DeepstackAdd launch failed: {self.error_name(code)}")
        return out


def reference(hidden, ids, tasks, table, prompt_vocab_size: int, vocab: int, levels: int, level: int):
    """hidden + the level-`level` rows of the batched table, in hidden's dtype (see the module doc)."""
    stride = prompt_vocab_size // (levels + 1)
    local = deepstack_row(ids.long(), vocab, stride, level)
    row = tasks.long() * prompt_vocab_size + local
    take = (local >= 0) & (tasks >= 0) & (row < table.shape[0])
    out = hidden.clone()
    out[take] = hidden[take] + table[row[take]]
    return out


@dataclass
class Case:
    """One batch: `tokens` tokens over `slots` batch slots, table stride `stride` (S > n per slot)."""

    name: str
    tokens: int
    hidden: int
    stride: int
    levels: int = 3
    slots: int = 3
    vocab: int = 151936
    dtype: torch.dtype = torch.float32
    table_slots: int | None = None  # slots the table holds (default all): tasks past it add nothing
    in_place: bool = False

    def make(self, seed: int, device):
        """hidden, ids, tasks, table, prompt_vocab_size (device int32 [1]) and P for this case."""
        g = torch.Generator().manual_seed(seed)
        p = (self.levels + 1) * self.stride
        table_slots = self.slots if self.table_slots is None else self.table_slots
        images = torch.randint(0, self.stride + 1, (self.slots,), generator=g)  # image tokens per slot, n <= S
        images[0] = max(int(images[0]), 1)
        tasks = torch.randint(0, self.slots, (self.tokens,), generator=g, dtype=torch.int32)
        tasks[0] = 0
        kind = torch.randint(0, 10, (self.tokens,), generator=g)
        text = torch.randint(0, self.vocab, (self.tokens,), generator=g)
        n = images[tasks.long()]
        image = self.vocab + (torch.rand(self.tokens, generator=g) * n).long()  # j < n: an image row
        stray = self.vocab + torch.randint(min(self.stride, p - 1), p, (self.tokens,), generator=g)  # j >= S: none
        ids = torch.where(kind < 5, image, torch.where(kind < 8, text, stray))
        ids = torch.where((kind < 5) & (n == 0), text, ids).to(torch.int32)
        ids[0] = self.vocab + int(images[0]) - 1  # the first token reads its slot's last image row
        if self.tokens > 2:
            tasks[-1] = -1  # no slot: add nothing
        hidden = (torch.randn(self.tokens, self.hidden, generator=g) * 4).to(self.dtype)
        table = torch.randn(table_slots * p, self.hidden, generator=g).to(self.dtype)
        pvs = torch.tensor([p], dtype=torch.int32)
        return [t.to(device) for t in (hidden, ids, tasks, table, pvs)] + [p]


def cases() -> list[Case]:
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        d = str(dtype).removeprefix("torch.")
        out += [
            Case(f"{d} one token", 1, 2048, 4, dtype=dtype),
            Case(f"{d} 7 tokens, hidden 33", 7, 33, 5, dtype=dtype),
            Case(f"{d} 333 tokens, hidden 1", 333, 1, 64, slots=4, dtype=dtype),
            Case(f"{d} 333 tokens, hidden 2049", 333, 2049, 96, slots=5, dtype=dtype),
            Case(f"{d} 4096 tokens, hidden 2048, stride 1024", 4096, 2048, 1024, slots=8, dtype=dtype),
            Case(f"{d} slots past the table", 500, 255, 16, slots=6, table_slots=3, dtype=dtype),
            Case(f"{d} one level", 300, 257, 8, levels=1, dtype=dtype),
            Case(f"{d} in place", 999, 2048, 128, slots=4, dtype=dtype, in_place=True),
        ]
    # more tokens than the grid's 65536 blocks: the block loop covers the rest
    out.append(Case("bfloat16 70001 tokens (grid-stride loop)", 70001, 64, 32, slots=16, dtype=torch.bfloat16))
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def run_case(kernel: Kernel, case: Case, device="cuda", seed: int = 0) -> dict:
    """Every level of the case through the kernel and the reference; figures for the report."""
    hidden, ids, tasks, table, pvs, p = case.make(seed, device)
    added = mismatches = 0
    for level in range(case.levels):
        want = reference(hidden, ids, tasks, table, p, case.vocab, case.levels, level)
        if case.in_place:
            got = hidden.clone()
            kernel.add(got, ids, tasks, table, pvs, case.vocab, case.levels, level, out=got)
        else:
            got = kernel.add(hidden, ids, tasks, table, pvs, case.vocab, case.levels, level)
        torch.cuda.synchronize()
        changed = (want != hidden).any(dim=1)
        added += int(changed.sum())
        if not bitwise_equal(got.cpu(), want.cpu()):
            diff = (got.float() - want.float()).abs()
            mismatches += int((diff > 0).any(dim=1).sum())
    return {"case": case.name, "tokens": case.tokens, "hidden": case.hidden, "stride": case.stride,
            "levels": case.levels, "rows_changed": added, "rows_mismatched": mismatches}


def check(lib: str | None, report: str | None) -> int:
    from tests.gpu.report import Part

    with Part("kernel", report) as part:
        if not torch.cuda.is_available():
            part.skip("torch sees no CUDA device")
        elif lib is None or not Path(lib).is_file():
            part.fail(f"the kernel library was not built ({lib})")
        else:
            kernel = Kernel(lib)
            part.figures["device"] = torch.cuda.get_device_name()
            part.figures["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
            for i, case in enumerate(cases()):
                r = run_case(kernel, case, "cuda", seed=i)
                part.check(case.name, r["rows_mismatched"] == 0 and r["rows_changed"] > 0,
                           f"{r['rows_mismatched']} rows differ from the reference bit for bit, "
                           f"{r['rows_changed']} rows had a DeepStack row added", **r)
            part.figures["cases"] = len(part.checks)
    return part.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--arch", default=os.environ.get("CUDA_ARCH", "90"))
    c = sub.add_parser("check")
    c.add_argument("--lib")
    c.add_argument("--report")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        t0 = time.monotonic()
        path = build_library(args.out, args.arch)
        print(f"built {path} for sm_{args.arch} in {time.monotonic() - t0:.1f}s", flush=True)
        return 0
    return check(args.lib, args.report)


if __name__ == "__main__":
    raise SystemExit(main())
