"""The DeepstackAdd plugin on the CPU: its CUDA translation unit compiles, its index arithmetic and
per-token add (the shared __host__ __device__ header, built for the host) and the stock-ops graph
agree with qwen3vl_triton.model.table over random batches, laid out as TensorRT-LLM's runtime lays them."""

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_triton.model.table import deepstack_add_reference, deepstack_row, pack_table
from qwen3vl_triton.trtllm import deepstack

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "builders" / "plugin"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")


def _tensorrt_include() -> Path | None:
    candidates = [
        os.environ.get("TENSORRT_INCLUDE_DIR"),
        "/usr/local/tensorrt/include",
        "/usr/include/x86_64-linux-gnu",
    ]
    for c in candidates:
        if c and (Path(c) / "NvInferRuntime.h").is_file():
            return Path(c)
    return None


def _cuda_include() -> Path | None:
    roots = [Path(NVCC).resolve().parent.parent] if NVCC else []
    roots += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    return next((r / "include" for r in roots if (r / "include" / "cuda_runtime_api.h").is_file()), None)


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"


# ---- compilation ------------------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_kernel_translation_unit_compiles_with_nvcc_for_sm90(tmp_path):
    _run([NVCC, "-std=c++17", "-arch=sm_90", "-Werror=all-warnings", "-I", PLUGIN / "include",
          "-c", PLUGIN / "src" / "deepstack_kernel.cu", "-o", tmp_path / "deepstack_kernel.o"])
    assert (tmp_path / "deepstack_kernel.o").stat().st_size > 0


@pytest.mark.skipif(_tensorrt_include() is None,
                    reason="TensorRT headers not found (set TENSORRT_INCLUDE_DIR): the IPluginV3 translation "
                           "unit was not compiled here")
def test_plugin_translation_unit_compiles_against_tensorrt_headers(tmp_path):
    assert CXX is not None and _cuda_include() is not None, "needs a C++ compiler and the CUDA headers"
    _run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-deprecated-declarations",
          "-fPIC", "-I", PLUGIN / "include", "-I", PLUGIN / "src", "-I", _tensorrt_include(), "-I", _cuda_include(),
          "-c", PLUGIN / "src" / "deepstack_plugin.cpp", "-o", tmp_path / "deepstack_plugin.o"])


def test_python_and_cpp_name_the_same_plugin():
    cpp = (PLUGIN / "src" / "deepstack_plugin.cpp").read_text()
    assert f'kPluginName = "{deepstack.PLUGIN_NAME}"' in cpp
    assert f'kPluginVersion = "{deepstack.PLUGIN_VERSION}"' in cpp
    assert f'kPluginNamespace = "{deepstack.PLUGIN_NAMESPACE}"' in cpp
    for field in deepstack.PLUGIN_FIELDS:
        assert cpp.count(f'PluginField("{field}"') == 2 and f'"{field}") == 0' in cpp, field
    cmake = (PLUGIN / "CMakeLists.txt").read_text()
    assert re.search(r"add_library\(qwen3vl_deepstack_plugin SHARED", cmake)
    assert deepstack.PLUGIN_LIBRARY == "libqwen3vl_deepstack_plugin.so"


# ---- the shared header on the host ------------------------------------------------------------

@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """tableRow/addToken of include/deepstack_add.h built for the CPU, loaded with ctypes."""
    if CXX is None:
        pytest.skip("no C++ compiler to build the host check of the kernel's header")
    lib = tmp_path_factory.mktemp("host") / "libdeepstack_host.so"
    _run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-I", PLUGIN / "include",
          PLUGIN / "test" / "host_deepstack.cpp", "-o", lib])
    dll = ctypes.CDLL(str(lib))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    dll.qwen3vl_deepstack_table_row.restype = i64
    dll.qwen3vl_deepstack_table_row.argtypes = [i32, i32, i32, i64, i32, i32, i32]
    dll.qwen3vl_deepstack_add_f32.restype = None
    dll.qwen3vl_deepstack_add_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, i64, i32, i64, i32, i32, i32]
    return dll


def _batch(rng, vocab, stride, levels, hidden, slots):
    """A step of an in-flight batch: per slot a request (or none), its table packed with the engine's
    stride, its token ids (text, image, and prompt-table ids past the image block); the batched
    table and `tasks` as PromptTuningBuffers builds them."""
    p = (levels + 1) * stride
    tables, ids, tasks, requests = [], [], [], []
    for slot in range(slots):
        kind = rng.integers(3)  # 0: no request in this slot, 1: text only, 2: with images
        if kind == 0:
            tables.append(None)
            continue
        n = int(rng.integers(0, stride + 1)) if kind == 2 else 0
        table = pack_table(torch.randn(n, hidden), [torch.randn(n, hidden) for _ in range(levels)], stride=stride)
        text = rng.integers(0, vocab, size=int(rng.integers(1, 6)))
        fake = vocab + np.arange(n)
        stray = vocab + rng.integers(stride, p, size=2) if stride < p else np.zeros(0, int)  # not image tokens
        tok = np.concatenate([text[:2], fake, stray, text[2:]]).astype(np.int32)
        tables.append(table if kind == 2 else None)
        ids.append(tok)
        # the runtime gives requests without a table task 0, whatever their slot
        tasks.append(np.full(tok.size, slot if kind == 2 else 0, np.int32))
        requests.append((tok, table if kind == 2 else torch.zeros(p, hidden)))
    if not ids:
        return _batch(rng, vocab, stride, levels, hidden, slots)
    tables = [t if t is not None else torch.zeros(p, hidden) for t in tables]
    return deepstack.batch_tables(tables, p), np.concatenate(ids), np.concatenate(tasks), requests, p


def _reference(hidden, requests, vocab, stride, level):
    out, offset = [], 0
    for tok, table in requests:
        h = hidden[offset:offset + tok.size]
        out.append(deepstack_add_reference(h, torch.from_numpy(tok.astype(np.int64)), table, vocab, stride, level))
        offset += tok.size
    return torch.cat(out)


CASES = [(vocab, stride, levels) for vocab in (5, 768, 151936) for stride in (1, 3, 8) for levels in (3, 1)]


@pytest.mark.parametrize("vocab, stride, levels", CASES)
def test_header_table_row_equals_deepstack_row_in_the_batched_table(host, vocab, stride, levels):
    rng = np.random.default_rng(vocab * 31 + stride * 7 + levels)
    table, ids, tasks, _, p = _batch(rng, vocab, stride, levels, hidden=4, slots=4)
    rows = table.shape[0]
    for level in range(levels):
        local = deepstack_row(ids.astype(np.int64), vocab, stride, level)
        want = np.where(local >= 0, tasks.astype(np.int64) * p + local, -1)
        got = [
            host.qwen3vl_deepstack_table_row(int(i), int(t), p, rows, vocab, levels, level) for i, t in zip(ids, tasks)
        ]
        np.testing.assert_array_equal(got, want)


def test_header_table_row_never_reads_past_the_table(host):
    vocab, stride, levels = 10, 4, 3
    p = (levels + 1) * stride
    # slot 2's rows lie past a table that holds two slots
    assert host.qwen3vl_deepstack_table_row(vocab + 1, 2, p, 2 * p, vocab, levels, 0) == -1
    assert host.qwen3vl_deepstack_table_row(vocab + 1, 1, p, 2 * p, vocab, levels, 2) == p + 3 * stride + 1


@pytest.mark.parametrize("vocab, stride, levels", CASES)
def test_header_add_equals_deepstack_add_reference_per_request(host, vocab, stride, levels):
    rng = np.random.default_rng(vocab + stride + 100 * levels)
    hidden_size = 24
    table, ids, tasks, requests, p = _batch(rng, vocab, stride, levels, hidden_size, slots=5)
    hidden = torch.randn(ids.size, hidden_size)
    for level in range(levels):
        out = torch.empty_like(hidden)
        host.qwen3vl_deepstack_add_f32(out.data_ptr(), hidden.data_ptr(), ids.ctypes.data, tasks.ctypes.data,
                                       table.data_ptr(), p, ids.size, hidden_size, table.shape[0], vocab, levels, level)
        torch.testing.assert_close(out, _reference(hidden, requests, vocab, stride, level), rtol=0, atol=0)


# ---- the stock-ops graph, on torch ------------------------------------------------------------

@pytest.mark.parametrize("vocab, stride, levels", CASES)
def test_stock_graph_equals_deepstack_add_reference_per_request(vocab, stride, levels):
    rng = np.random.default_rng(7 * vocab + stride + levels)
    table, ids, tasks, requests, p = _batch(rng, vocab, stride, levels, hidden=16, slots=5)
    hidden = torch.randn(ids.size, 16)
    for level in range(levels):
        rows = torch.from_numpy(deepstack.local_rows(p, levels, level))
        out = deepstack.deepstack_add_graph(deepstack.TORCH_OPS, hidden, torch.from_numpy(ids), table,
                                            torch.from_numpy(tasks), torch.tensor([p], dtype=torch.int32), rows, vocab)
        torch.testing.assert_close(out, _reference(hidden, requests, vocab, stride, level), rtol=0, atol=0)


def test_local_rows_is_deepstack_row_of_every_prompt_table_id():
    rows = deepstack.local_rows(16, 3, 1)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [8, 9, 10, 11] + [-1] * 12)
    with pytest.raises(ValueError, match="not 4 stacked blocks"):
        deepstack.local_rows(10, 3, 0)


# ---- the plugin object, with TensorRT's headers but without its library -------------------------

@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """builders/plugin/test/registry_harness.cpp + the plugin, as one library: a recording plugin
    registry in place of libnvinfer's, the header's host loop in place of the CUDA launcher."""
    include = _tensorrt_include()
    if include is None or CXX is None or _cuda_include() is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_INCLUDE_DIR): the plugin object was not exercised here")
    lib = tmp_path_factory.mktemp("harness") / "libharness.so"
    _run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-deprecated-declarations",
          "-shared", "-fPIC", "-I", PLUGIN / "include", "-I", PLUGIN / "src", "-I", include, "-I", _cuda_include(),
          PLUGIN / "test" / "registry_harness.cpp", PLUGIN / "src" / "deepstack_plugin.cpp", "-o", lib])
    dll = ctypes.CDLL(str(lib))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    dll.harness_registered.argtypes = [i32, ctypes.c_char_p, i32]
    dll.harness_run.argtypes = [i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i64]
    dll.harness_rejects.argtypes = [i32, i32, i32]
    return dll


def test_loading_the_library_registers_the_creator_once(harness):
    names, buf = [], ctypes.create_string_buffer(256)
    while harness.harness_registered(len(names), buf, 256):
        names.append(buf.value.decode())
    ns = deepstack.PLUGIN_NAMESPACE
    assert names == [f"{deepstack.PLUGIN_NAME}/{deepstack.PLUGIN_VERSION}/{ns}/{ns}"]


def test_plugin_object_builds_serializes_and_enqueues_the_reference_add(harness):
    rng = np.random.default_rng(3)
    vocab, stride, levels, hidden_size = 768, 6, 3, 32
    table, ids, tasks, requests, p = _batch(rng, vocab, stride, levels, hidden_size, slots=4)
    hidden = torch.randn(ids.size, hidden_size)
    pvs = np.array([p], np.int32)
    for level in range(levels):
        out = torch.empty_like(hidden)
        status = harness.harness_run(vocab, levels, level, out.data_ptr(), hidden.data_ptr(), ids.ctypes.data,
                                     tasks.ctypes.data, table.data_ptr(), pvs.ctypes.data, ids.size, hidden_size,
                                     table.shape[0])
        assert status == 0, f"harness step {status} failed"
        torch.testing.assert_close(out, _reference(hidden, requests, vocab, stride, level), rtol=0, atol=0)


@pytest.mark.parametrize("levels, level", [(3, 3), (3, -1), (0, 0)])
def test_creator_refuses_a_level_outside_the_table(harness, levels, level):
    assert harness.harness_rejects(768, levels, level) == 1
