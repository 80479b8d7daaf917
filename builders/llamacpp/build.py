"""Build llama.cpp's `llama-server`, and the `llama-cpp-python` bindings the engine's ggml runner
uses, from the PyPI source distribution of `llama-cpp-python`.

    python builders/llamacpp/build.py            # -> build/llamacpp/bin/llama-server
    python builders/llamacpp/build.py --print    # the binary's path, building it first if missing
    python builders/llamacpp/build.py --python-package [--portable]   # llama-cpp-python into this venv

The Python package (`make venv` installs it): pip builds the pinned sdist (sha256-checked, its
own download) with scikit-build-core (pinned, no build isolation) and only what the runner
loads: libllama and libggml with the CPU backend -- no llava/mtmd, no server, tools, tests or
examples, and no `common` library (python_lib.cmake: it was 61% of the compile time). pip keeps
the built wheel in its cache, keyed by the sdist's URL and hash, NOT by these flags: a changed
flag needs `--no-cache-dir` (`--portable` always passes it). Flags:
- host build (default): GGML_NATIVE, the build host's own instructions (AVX2, AVX-512, AMX ...);
- `--portable` (a Docker image): GGML_NATIVE=OFF, GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON --
  one libggml-cpu-<variant>.so per x86 level, the best one for the CPU loaded at run time (the
  runner points ggml at the package's lib/ folder).

The sdist carries the whole llama.cpp tree (vendor/llama.cpp); it is downloaded once with pip,
checked against its sha256, unpacked under build/llamacpp/src and built with CMake: Release,
GGML_NATIVE (the host's own instruction set: AVX2, AVX-512, AMX where the CPU has them), static
libraries, only the `llama-server` target, no web UI, no network features. CMake is the
machine's (>= 3.14) or, when it has none, the `cmake` wheel from PyPI installed in this venv.
The same tree's `convert_hf_to_gguf.py` and `gguf-py` convert the checkpoints (convert.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "llamacpp"

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp that is built
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_WHEEL = "cmake==3.31.6"  # only when the machine has no CMake >= 3.14

SCIKIT_BUILD_CORE = "scikit-build-core==1.1.2"  # llama-cpp-python's build backend, pinned (no build isolation)
PYTHON_LIB_CMAKE = Path(__file__).resolve().parent / "python_lib.cmake"

# llama-cpp-python's own CMakeLists.txt builds libllama and libggml (forced shared) and, unless
# told otherwise, llava/mtmd and llama.cpp's `common`
PYTHON_CMAKE_OPTIONS = {
    "LLAVA_BUILD": "OFF",  # the vision tower is the project's
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_TOOLS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "CMAKE_PROJECT_llama.cpp_INCLUDE": str(PYTHON_LIB_CMAKE),  # no `common` (see python_lib.cmake)
}
NATIVE = {"GGML_NATIVE": "ON"}
PORTABLE = {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON"}

CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "ON",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",  # the server lives under tools/
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",  # would download the web UI
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
}


def log(msg: str) -> None:
    print(f"[llamacpp] {msg}", flush=True)


def source_dir(build: Path = BUILD) -> Path:
    return build / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def server_binary(build: Path = BUILD) -> Path:
    return build / "bin" / "llama-server"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_source(build: Path = BUILD) -> Path:
    """The llama.cpp tree of the pinned sdist, downloaded and unpacked once."""
    tree = source_dir(build)
    if (tree / "CMakeLists.txt").is_file():
        return tree
    dl = build / "download"
    archive = dl / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        log(f"downloading the llama-cpp-python {VERSION} source distribution (~77 MB) ...")
        dl.mkdir(parents=True, exist_ok=True)
        # pip reads the sdist's metadata through its build backend (scikit-build-core, fetched into
        # an isolated environment): a minute or two beside the download
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(dl)], check=True)
    digest = sha256(archive)
    if digest != SHA256:
        raise SystemExit(f"{archive}: sha256 {digest}, expected {SHA256}")
    log(f"unpacking {archive.name} ...")
    with tarfile.open(archive) as tar:
        tar.extractall(build / "src", filter="data")
    if not (tree / "CMakeLists.txt").is_file():
        raise SystemExit(f"{archive} has no llama.cpp tree at {tree.relative_to(build / 'src')}")
    return tree


def find_cmake(minimum: tuple[int, int] = (3, 14)) -> str:
    """The machine's CMake when it is new enough (llama.cpp: 3.14), else the PyPI wheel's."""
    for candidate in (shutil.which("cmake"), str(Path(sys.executable).parent / "cmake")):
        if candidate and Path(candidate).is_file():
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"(\d+)\.(\d+)", out)
            if m and (int(m[1]), int(m[2])) >= minimum:
                return candidate
    log(f"no CMake >= {minimum[0]}.{minimum[1]} on this machine: installing {CMAKE_WHEEL} in {sys.prefix}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", CMAKE_WHEEL], check=True)
    return str(Path(sys.executable).parent / "cmake")


def build_server(build: Path = BUILD, jobs: int | None = None) -> Path:
    """Configure and build `llama-server`; returns its path. CMake prints the progress."""
    tree = fetch_source(build)
    cmake = find_cmake()
    cmake_dir = build / "cmake"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (cmake_dir / "CMakeCache.txt").is_file():
        log(f"configuring {tree} with {cmake} ...")
        subprocess.run([cmake, "-S", str(tree), "-B", str(cmake_dir), *generator,
                        *(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items())], check=True)
    jobs = jobs or os.cpu_count() or 1
    log(f"building llama-server with {jobs} jobs (once; minutes on an idle 2-core host, longer on a busy one) ...")
    t0 = time.perf_counter()
    subprocess.run([cmake, "--build", str(cmake_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    binary = server_binary(build)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cmake_dir / "bin" / "llama-server", binary)
    log(f"built {binary} in {time.perf_counter() - t0:.0f}s")
    return binary


def python_cmake_args(portable: bool = False) -> str:
    """CMAKE_ARGS of the llama-cpp-python build."""
    options = {**PYTHON_CMAKE_OPTIONS, **(PORTABLE if portable else NATIVE)}
    return " ".join(f"-D{k}={v}" for k, v in options.items())


def install_python_package(portable: bool = False) -> None:
    """Build and install llama-cpp-python (pinned, hash-checked) into this interpreter's
    environment; pip reuses its cached wheel when it has one."""
    import tempfile

    find_cmake((3, 21))  # a CMake wheel when the machine has none new enough for llama-cpp-python
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", SCIKIT_BUILD_CORE], check=True)
    env = {**os.environ, "CMAKE_ARGS": python_cmake_args(portable)}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"llama-cpp-python=={VERSION} --hash=sha256:{SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-binary", "llama-cpp-python", "-r", req.name]
    if portable:
        cmd.append("--no-cache-dir")  # never a wheel cached from a native build
    log(f"installing llama-cpp-python {VERSION} (built from its source distribution once, then from pip's "
        f"cache; minutes on a 2-core host): CMAKE_ARGS={env['CMAKE_ARGS']}")
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, env=env)
    finally:
        os.unlink(req.name)
    log(f"llama-cpp-python {VERSION} installed in {time.perf_counter() - t0:.0f}s")


def ensure_server(build: Path = BUILD) -> Path:
    """The built binary; builds it when it is missing."""
    binary = server_binary(build)
    return binary if binary.is_file() else build_server(build)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", type=Path, default=BUILD)
    ap.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    ap.add_argument("--print", action="store_true", help="print the binary's path (building it if missing)")
    ap.add_argument("--python-package", action="store_true",
                    help="build and install llama-cpp-python (the ggml runner's bindings) into this environment")
    ap.add_argument("--portable", action="store_true",
                    help="with --python-package: CPU variants loaded at run time instead of this host's instructions")
    args = ap.parse_args(argv)
    if args.python_package:
        install_python_package(args.portable)
        return 0
    binary = ensure_server(args.build_dir) if args.print else build_server(args.build_dir, args.jobs)
    if args.print:
        print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
