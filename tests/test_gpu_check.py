"""tests/gpu/device_check.sh on a host without a GPU: everything it runs that a CPU can check.

The script parses and runs to its report (parts without a device say SKIP or FAIL with a reason);
the kernel's C entry point builds with nvcc and loads; the reference the device compares the kernel
with agrees with the per-request reference and with the kernel's own header run on the host (the
scalar and the 16-byte packed path); the timed decoder layer computes a MoE; the bundle recipe's
pins and trimmed server hold; the serving part passes with system shared memory."""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.gpu import bundle, deepstack_gpu, serving, timing
from tests.gpu.deepstack_gpu import cases, reference
from tests.gpu.report import Part
from tests.test_trtllm_plugin import _batch, _reference

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gpu" / "device_check.sh"
CXX = shutil.which("g++") or shutil.which("c++")
NO_GPU = not torch.cuda.is_available()


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_script_passes_only_options_its_modules_take():
    text = SCRIPT.read_text()
    calls = re.findall(r"-m (tests\.gpu\.\w+)((?: (?:build|check))?)((?:[^\n]|\\\n)*)", text)
    assert {m for m, _, _ in calls} == {"tests.gpu.deepstack_gpu", "tests.gpu.timing", "tests.gpu.serving"}
    for module, sub, rest in calls:
        cmd = [sys.executable, "-m", module, *sub.split(), "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        for option in re.findall(r"(--[a-z][a-z-]+)", rest):
            assert option in proc.stdout, f"{module}{sub} takes no {option}"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole script, once, here: no device, no bundle (the kernel library is still built)."""
    if not NO_GPU:
        pytest.skip("this host has a GPU: the dry run is for hosts without one")
    base = tmp_path_factory.mktemp("device_check")
    env = dict(os.environ, PYTHON=sys.executable, GPU_BUNDLE=str(base / "no-bundle"),
               DEVICE_CHECK_WORK=str(base / "work"), DEVICE_CHECK_BUDGET="400")
    proc = subprocess.run(["bash", str(SCRIPT), str(base / "out")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    return base, proc


def test_the_dry_run_reports_every_part_with_a_reason(dry_run):
    base, proc = dry_run
    assert proc.returncode == 1, proc.stdout[-3000:]  # parts failed: no device, no bundle
    report = json.loads((base / "out" / "report.json").read_text())
    assert list(report) == ["env", "kernel", "timing", "serving"]
    assert report["env"]["status"] == "FAIL" and "no CUDA device" in report["env"]["reason"]
    assert report["kernel"]["status"] == "SKIP" and "no CUDA device" in report["kernel"]["reason"]
    assert report["timing"]["status"] == "SKIP"
    assert report["serving"]["status"] == "FAIL" and "make gpu-bundle" in report["serving"]["reason"]
    for name in report:
        assert json.loads((base / "out" / f"{name}.json").read_text())["status"] == report[name]["status"]
    log = (base / "out" / "log.txt").read_text()
    assert "==== device check summary" in log and "== kernel: SKIP" in log
    assert (base / "out" / "serving.log").is_file()


@pytest.fixture(scope="module")
def kernel_library(dry_run):
    base, proc = dry_run
    lib = base / "work" / "kernel" / deepstack_gpu.LIBRARY
    if shutil.which("nvcc") is None and not lib.is_file():
        pytest.skip("nvcc is not installed: the kernel library was not built here")
    assert lib.is_file(), proc.stdout[-3000:]
    return deepstack_gpu.Kernel(lib)


def test_the_c_entry_point_reports_cuda_errors_without_a_gpu(kernel_library):
    k = kernel_library
    x = torch.zeros(2, 8)
    ids = torch.zeros(2, dtype=torch.int32)
    pvs = torch.tensor([4], dtype=torch.int32)
    code = k.lib.qwen3vl_deepstack_launch(7, x.data_ptr(), x.data_ptr(), ids.data_ptr(), ids.data_ptr(),
                                          x.data_ptr(), pvs.data_ptr(), 2, 8, 2, 10, 3, 0, None)
    assert k.error_name(code) == "cudaErrorInvalidValue"  # no such element type
    empty = torch.zeros(0, 8)
    assert k.launch(empty, empty, ids[:0], ids[:0], x, pvs, 10, 3, 0) == 0  # nothing to do, nothing launched
    assert k.lib.qwen3vl_deepstack_sync(None) != 0  # no device here: an error code, not a crash
    with pytest.raises(RuntimeError, match="launch failed: cuda"):
        k.add(x, ids, ids, x, pvs, 10, 3, 0)


# ---- the reference the device compares with ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, stride, levels", [(5, 1, 3), (768, 3, 3), (151936, 8, 1)])
def test_batched_reference_equals_the_per_request_reference(dtype, vocab, stride, levels):
    rng = np.random.default_rng(stride + levels)
    table, ids, tasks, requests, p = _batch(rng, vocab, stride, levels, hidden=24, slots=5)
    hidden = (torch.randn(ids.size, 24) * 4).to(dtype)
    requests = [(tok, t.to(dtype)) for tok, t in requests]
    for level in range(levels):
        got = reference(hidden, torch.from_numpy(ids), torch.from_numpy(tasks), table.to(dtype), p, vocab, levels,
                        level)
        assert deepstack_gpu.bitwise_equal(got, _reference(hidden, requests, vocab, stride, level))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The kernel's header built for the CPU (builders/plugin/test/host_deepstack.cpp)."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("host") / "libhost.so"
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-I",
                    str(deepstack_gpu.PLUGIN / "include"), str(deepstack_gpu.PLUGIN / "test" / "host_deepstack.cpp"),
                    "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    dll.qwen3vl_deepstack_add_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, i64, i32, i64, i32, i32, i32]
    dll.qwen3vl_deepstack_add_f32_packed.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, i64, i32, i64, i32, i32, i32, i32]
    return dll


FLOAT_CASES = [c for c in cases() if c.dtype == torch.float32]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=[c.name for c in FLOAT_CASES])
def test_the_device_cases_through_the_kernels_header_on_the_host_equal_the_reference(host, case):
    hidden, ids, tasks, table, pvs, p = case.make(seed=3, device="cpu")
    for level in range(case.levels):
        want = reference(hidden, ids, tasks, table, p, case.vocab, case.levels, level)
        args = (ids.data_ptr(), tasks.data_ptr(), table.data_ptr(), p, case.tokens, case.hidden, table.shape[0],
                case.vocab, case.levels, level)
        out = hidden.clone() if case.in_place else torch.empty_like(hidden)
        host.qwen3vl_deepstack_add_f32(out.data_ptr(), (out if case.in_place else hidden).data_ptr(), *args)
        assert deepstack_gpu.bitwise_equal(out, want), "scalar path"
        if case.hidden % 4 == 0:
            for step in (1, 3):  # packs per thread step: all of a row in one step, or strided
                out = hidden.clone() if case.in_place else torch.empty_like(hidden)
                host.qwen3vl_deepstack_add_f32_packed(out.data_ptr(), (out if case.in_place else hidden).data_ptr(),
                                                      *args, step)
                assert deepstack_gpu.bitwise_equal(out, want), f"packed path, step {step}"


def test_the_cases_cover_dtypes_odd_sizes_strides_text_and_rows_past_the_table():
    all_cases = cases()
    assert {c.dtype for c in all_cases} == {torch.float32, torch.float16, torch.bfloat16}
    assert {1, 7, 333} <= {c.tokens for c in all_cases} and max(c.tokens for c in all_cases) > 65536
    assert any(c.hidden % 32 for c in all_cases) and any(c.in_place for c in all_cases)
    assert any(c.table_slots is not None and c.table_slots < c.slots for c in all_cases)
    for case in (c for c in all_cases if c.tokens < 10000):
        hidden, ids, tasks, table, pvs, p = case.make(seed=0, device="cpu")
        local = ids.long() - case.vocab
        image = (local >= 0) & (local < case.stride)
        assert image[0] and int(pvs) == p == (case.levels + 1) * case.stride
        assert (~image).any() or case.tokens == 1  # text or stray prompt ids: rows that add nothing
        changed = (reference(hidden, ids, tasks, table, p, case.vocab, case.levels, 0) != hidden).any(1)
        assert changed.any() and (changed <= image).all()


# ---- the timed layer -------------------------------------------------------------------------------

SMALL = timing.LayerShape(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, moe_intermediate=32)


def test_the_timed_layers_moe_is_a_top_k_mixture_of_expert_mlps():
    layer = timing.DecoderLayer(SMALL, device="cpu", dtype=torch.float32, grouped=False)
    x = torch.randn(23, SMALL.hidden)
    h = timing.rms_norm(x, layer.post_norm, SMALL.eps)
    probs = torch.softmax(h @ layer.w_router, -1)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, e = probs[t].topk(SMALL.top_k)
        for weight, expert in zip(w / w.sum(), e.tolist()):
            gate, up = (h[t] @ layer.w_gate_up[expert]).chunk(2)
            want[t] += weight * ((F.silu(gate) * up) @ layer.w_down[expert])
    torch.testing.assert_close(layer.moe(x), want, rtol=1e-4, atol=1e-5)
    if hasattr(torch, "_grouped_mm"):
        layer.grouped = True
        bf16 = timing.DecoderLayer(SMALL, device="cpu", dtype=torch.bfloat16, grouped=False)
        looped = bf16.moe(x.bfloat16())
        bf16.grouped = True
        torch.testing.assert_close(bf16.moe(x.bfloat16()), looped, rtol=0, atol=0)


def test_the_timed_layer_runs_prefill_and_decode_steps():
    layer = timing.DecoderLayer(SMALL, device="cpu", dtype=torch.float32)
    x = torch.randn(9, SMALL.hidden)
    out = layer.prefill(x)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)
    caches = [torch.randn(3, SMALL.kv_heads, 12, SMALL.head_dim) for _ in range(2)]
    out = layer.decode(torch.randn(3, SMALL.hidden), *caches)
    assert out.shape == (3, SMALL.hidden) and torch.isfinite(out).all()
    # causal: a prefix's outputs do not depend on the tokens after it
    torch.testing.assert_close(layer.prefill(x[:4]), layer.prefill(x)[:4], rtol=1e-5, atol=1e-5)


# ---- the part reports ----------------------------------------------------------------------------------

def test_a_part_fails_on_a_failed_check_or_an_exception_and_always_writes_its_report(tmp_path, capsys):
    with Part("a", tmp_path / "a.json") as part:
        part.check("good", True)
        part.check("bad", False, "why")
    assert part.finish() == 1 and json.loads((tmp_path / "a.json").read_text())["status"] == "FAIL"
    with Part("b", tmp_path / "b.json") as part:
        part.check("good", True)
        raise ValueError("boom")
    assert part.finish() == 1
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["status"] == "FAIL" and "ValueError: boom" in b["reason"] and "traceback" in b["figures"]
    with Part("c", tmp_path / "c.json") as part:
        part.skip("no device")
    assert part.finish() == 0 and json.loads((tmp_path / "c.json").read_text())["status"] == "SKIP"
    with Part("d", None) as part:
        pass
    assert part.finish() == 1  # a part that checked nothing did not pass
    assert "== a: FAIL -- 1 of 2 checks failed: bad" in capsys.readouterr().out


# ---- the bundle ------------------------------------------------------------------------------------------

def test_the_bundle_pins_what_requirements_txt_pins():
    ours = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s#]+)", line)
        if m:
            ours[m.group(1).lower()] = m.group(2)
    pins = bundle.pins()
    shared = set(pins) & set(ours)
    assert {"numpy", "tritonclient", "nvidia-pytriton"} <= shared
    assert {name: pins[name] for name in shared} == {name: ours[name] for name in shared}
    assert pins["numpy"] < "2"


def test_the_bundle_pins_cover_what_tritonclients_grpc_client_imports():
    pins = bundle.pins()
    requires = metadata.requires("tritonclient") or []
    grpc = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requires
            if "extra == 'grpc'" in r or ";" not in r}
    # numpy, packaging and urllib3 the GPU host has (numpy pinned here for the stub)
    assert grpc - set(pins) <= {"packaging", "urllib3"}


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is needed to read DT_NEEDED")
def test_the_trimmed_server_resolves_every_library_it_needs_from_the_wheel():
    try:
        dist = metadata.distribution("nvidia-pytriton")
    except metadata.PackageNotFoundError:
        pytest.skip("nvidia-pytriton is not installed (make venv)")
    assert dist.version == bundle.pins()["nvidia-pytriton"]  # the same wheel the bundle trims
    names = [str(f) for f in dist.files if str(f).startswith(bundle.LIBS) or str(f) in bundle.SERVER_FILES]
    files = {n: Path(dist.locate_file(n)).read_bytes() for n in names}
    members = bundle.server_members(files)
    libs = {m.removeprefix(bundle.LIBS) for m in members if m.startswith(bundle.LIBS)}
    assert any(lib.startswith("libtritonserver-") for lib in libs) and any(lib.startswith("libcudart-") for lib in libs)
    assert not any(lib.startswith("libpython") for lib in libs)  # the host's own libpython3.12 serves the stub
    assert "pytriton/tritonserver/backends/python/triton_python_backend_stub" in members
    assert members["pytriton/tritonserver/backends/python/triton_python_backend_stub"] == files[
        f"pytriton/tritonserver/python_backend_stubs/{bundle.STUB_PYTHON}/triton_python_backend_stub"]
    assert "libpython3.12.so.1.0" in bundle.needed(members["pytriton/tritonserver/backends/python/"
                                                           "triton_python_backend_stub"])
    assert sum(map(len, members.values())) < 0.85 * sum(map(len, files.values()))


def test_a_library_neither_bundled_nor_on_the_system_stops_the_bundle(monkeypatch):
    files = {src: b"" for src in bundle.SERVER_FILES}
    monkeypatch.setattr(bundle, "needed", lambda data: ["libc.so.6", "libmissing.so.1"])
    with pytest.raises(RuntimeError, match="libmissing.so.1"):
        bundle.server_members(files)


# ---- serving, with system shared memory --------------------------------------------------------------

@pytest.mark.server
def test_the_serving_part_passes_with_system_shared_memory(tmp_path, tiny_checkpoint):
    report = tmp_path / "serving.json"
    assert serving.run(tmp_path / "work", str(report), checkpoint=str(tiny_checkpoint), transport="shm",
                       cases=["two images"]) == 0
    out = json.loads(report.read_text())
    assert out["status"] == "PASS" and out["figures"]["transport"] == "shm"
    assert [c["ok"] for c in out["checks"]] == [True] * 7  # numpy, 4 for the case, 2 servers alive
    (case,) = out["figures"]["cases"]
    assert case["chunks"] >= 2 and case["payload_bytes"] == case["table_bytes"]


# ---- the bundle's server and stubs' environment, under Python 3.12 ------------------------------------

ECHO_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils
import typing_extensions  # noqa: F401 -- from the host's site-packages, through the environment's .pth

from qwen3vl_triton.errors import InputError  # noqa: F401 -- from the checkout, through its .pth


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "text").as_numpy()
            reply = np.array([[t.upper() + b" / numpy " + np.__version__.encode() for t in text.reshape(-1)]],
                             dtype=np.object_)
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("reply", reply)]))
        return out
'''
ECHO_CONFIG = '''name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ 1, -1 ] } ]
output [ { name: "reply" data_type: TYPE_STRING dims: [ 1, -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "%s" } }
'''


def _python(version: str) -> str | None:
    """An interpreter of `version` with its shared libpython (the stub links it), if this host has one."""
    for candidate in (shutil.which(f"python{version}"), f"/root/.pyenv/versions/{version}.1/bin/python{version}"):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import sysconfig, os; d = sysconfig.get_config_var('LIBDIR'); "
                                    f"print(os.path.isfile(os.path.join(d, 'libpython{version}.so.1.0')))"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == "True":
                return candidate
    return None


@pytest.mark.server
def test_the_bundled_server_serves_bytes_from_a_python_312_stub_environment(tmp_path):
    """What the GPU host does before the serving part: unpack the trimmed server, build the stubs'
    environment from the host's Python (3.12) and the bundle's wheels; here with a model that
    echoes BYTES, which the 2.51 stub corrupts under numpy 2."""
    bundle_dir = ROOT / "build" / "gpu-bundle"
    if not (bundle_dir / "MANIFEST.json").is_file():
        pytest.skip("no build/gpu-bundle here: make gpu-bundle builds it (a 55 MB download)")
    py = _python(bundle.STUB_PYTHON)
    if py is None:
        pytest.skip(f"no Python {bundle.STUB_PYTHON} with a shared libpython on this host")
    host = tmp_path / "host"  # stands for the GPU host's interpreter: a plain venv of that Python
    subprocess.run([py, "-m", "venv", str(host)], check=True)
    # pure-Python packages the GPU host's image has and grpcio / tritonclient import
    subprocess.run([str(host / "bin" / "python"), "-m", "pip", "install", "--quiet", "typing_extensions", "packaging"],
                   check=True)
    work = tmp_path / "work"
    work.mkdir()
    prep = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "prepare_serving.sh"), str(bundle_dir), str(work),
                           str(host / "bin" / "python")], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PREPARE_IMPORTS="numpy tritonclient.grpc"))
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert "stub env: numpy 1.26" in prep.stdout
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG % (work / "stubenv"))

    from qwen3vl_triton.serve.server import Ports, TritonServer, free_ports

    libdir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    env = {"TRITONSERVER": str(work / "server" / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
           "LD_LIBRARY_PATH": ":".join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        srv = TritonServer(repo, Ports(*free_ports(3)), build_dir=tmp_path, log_file=tmp_path / "server.log",
                           extra_args=["--allow-gpu-metrics=false"])
        with srv:
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(srv.grpc_url) as client:
                inp = grpcclient.InferInput("text", [1, 2], "BYTES")
                inp.set_data_from_numpy(np.array([[b"h\xc3\xa9llo", b"disaggregated"]], dtype=np.object_))
                reply = client.infer("echo", [inp]).as_numpy("reply").reshape(-1).tolist()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert reply == [b"H\xc3\xa9LLO / numpy 1.26.4", b"DISAGGREGATED / numpy 1.26.4"]
