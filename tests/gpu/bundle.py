"""Build the bundle tests/gpu/device_check.sh needs on the GPU host (`make gpu-bundle`).

The host has Python 3.12 with torch, transformers and nvcc, but no Triton server, no tritonclient
and numpy 2 (the Triton 2.51 Python-backend stub corrupts BYTES tensors with numpy 2). The bundle
brings, as pinned in tests/gpu/bundle-requirements.txt (downloaded with --require-hashes):

- tritonserver.tar.xz: tritonserver 2.51 from the nvidia-pytriton wheel, trimmed to what the server
  loads here -- bin/tritonserver, the Python backend with the Python 3.12 stub, and the wheel's
  bundled libraries those three need (their DT_NEEDED closure, read with readelf), laid out as in
  the wheel so the binaries' RPATHs hold;
- wheels/: numpy < 2, tritonclient and the packages its gRPC client imports, installed on the host
  into the stubs' environment;
- MANIFEST.json: every file's size and sha256.

Everything travels with the device tool's `carry`, 64 MiB together with the checkout; the build
fails when the bundle leaves the checkout less than `--margin` of that.

    python -m tests.gpu.bundle [--out build/gpu-bundle] [--cache build/gpu-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = Path(__file__).resolve().parent / "bundle-requirements.txt"
LIMIT = 64 * 2**20  # what one device call may carry: checkout + carried paths
STUB_PYTHON = "3.12"  # the GPU host's python3
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
SERVER_WHEEL = "nvidia_pytriton"
# wheel member -> where it goes in the bundle (the wheel's layout: RPATHs are relative to it)
SERVER_FILES = {
    "pytriton/tritonserver/bin/tritonserver": "pytriton/tritonserver/bin/tritonserver",
    "pytriton/tritonserver/backends/python/libtriton_python.so":
        "pytriton/tritonserver/backends/python/libtriton_python.so",
    "pytriton/tritonserver/backends/python/triton_python_backend_utils.py":
        "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
    f"pytriton/tritonserver/python_backend_stubs/{STUB_PYTHON}/triton_python_backend_stub":
        "pytriton/tritonserver/backends/python/triton_python_backend_stub",
}
LIBS = "nvidia_pytriton.libs/"
# libraries the host's system provides (glibc, the C++ runtime, zlib) and the stub's libpython,
# which is the host interpreter's own
SYSTEM = re.compile(r"^(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|libz|ld-linux-x86-64)"
                    r"\.so(\.\d+)*$|^libpython3\.\d+\.so(\.\d+)*$")


def pins(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{distribution name: version} of the bundle's requirements."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)\s+--hash=sha256:[0-9a-f]{64}$", line)
            if not m:
                raise ValueError(f"{path}: not 'name==version --hash=sha256:...': {line!r}")
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def download(cache: Path) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--python-version", STUB_PYTHON, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
           "-d", str(cache), "-r", str(REQUIREMENTS)]
    subprocess.run(cmd, check=True)
    wheels = []
    for name, version in pins().items():
        stem = re.sub(r"[-_.]+", "_", name)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"), key=lambda p: p.name.lower())
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel of {name}=={version} in {cache}, found {[p.name for p in found]}")
        wheels.append(found[0])
    return wheels


def needed(data: bytes) -> list[str]:
    """DT_NEEDED entries of an ELF file (readelf -d)."""
    with _temp_file(data) as path:
        out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


class _temp_file:
    def __init__(self, data: bytes):
        import tempfile

        self.file = tempfile.NamedTemporaryFile(suffix=".so")
        self.file.write(data)
        self.file.flush()

    def __enter__(self) -> Path:
        return Path(self.file.name)

    def __exit__(self, *exc):
        self.file.close()


def server_members(files: dict[str, bytes]) -> dict[str, bytes]:
    """The trimmed server from the wheel's files ({member: bytes}): SERVER_FILES plus the closure of
    their needed libraries in nvidia_pytriton.libs/; an unresolvable library is an error."""
    missing = [m for m in SERVER_FILES if m not in files]
    if missing:
        raise RuntimeError(f"the {SERVER_WHEEL} wheel lacks {missing}")
    bundled = {m[len(LIBS):]: m for m in files if m.startswith(LIBS) and not m.endswith("/")}
    out = {dst: files[src] for src, dst in SERVER_FILES.items()}
    todo = [files[src] for src in SERVER_FILES if not src.endswith(".py")]
    unresolved = set()
    while todo:
        for lib in needed(todo.pop()):
            if lib in bundled:
                if bundled[lib] not in out:
                    out[bundled[lib]] = files[bundled[lib]]
                    todo.append(files[bundled[lib]])
            elif not SYSTEM.match(lib):
                unresolved.add(lib)
    if unresolved:
        raise RuntimeError(f"libraries neither in the wheel nor the host's system: {sorted(unresolved)}")
    return out


def wheel_files(wheel: Path, wanted=lambda name: True) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist() if wanted(n)}


def server_archive(wheel: Path, out: Path) -> dict:
    """Write tritonserver.tar.xz (deterministic: sorted members, fixed times and owners)."""
    files = wheel_files(wheel, lambda n: n.startswith(LIBS) or n in SERVER_FILES)
    members = server_members(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uid, info.gid = len(members[name]), 0, 0, 0
            info.mode = 0o644 if name.endswith(".py") else 0o755
            tar.addfile(info, io.BytesIO(members[name]))
    out.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return {"members": sorted(members), "unpacked_bytes": sum(len(b) for b in members.values())}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkout_bytes() -> int:
    """What the device tool sends of the checkout: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def build(out: Path, cache: Path, margin: int) -> dict:
    wheels = download(cache)
    server_wheel = next(w for w in wheels if w.name.startswith(SERVER_WHEEL + "-"))
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    archive = out / "tritonserver.tar.xz"
    # the archive takes minutes to compress: reuse the cached one made from the same wheel
    cached, stamp = cache / "tritonserver.tar.xz", cache / "tritonserver.tar.xz.json"
    wheel_sha = sha256(server_wheel)
    meta = json.loads(stamp.read_text()) if stamp.is_file() and cached.is_file() else {}
    if meta.get("wheel_sha256") != wheel_sha or meta.get("files") != SERVER_FILES:
        print(f"trimming and compressing tritonserver from {server_wheel.name} (a few minutes) ...", flush=True)
        meta = server_archive(server_wheel, cached) | {"wheel": server_wheel.name, "wheel_sha256": wheel_sha,
                                                       "files": SERVER_FILES}
        stamp.write_text(json.dumps(meta, indent=1))
    shutil.copyfile(cached, archive)
    for w in wheels:
        if w is not server_wheel:
            shutil.copyfile(w, out / "wheels" / w.name)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {"requirements": pins(), "server": {k: meta[k] for k in ("wheel", "members", "unpacked_bytes")},
                "stub_python": STUB_PYTHON,
                "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    tree = checkout_bytes()
    print(f"{out}: {total / 2**20:.1f} MiB ({len(files)} files); checkout {tree / 2**20:.1f} MiB; "
          f"together {(total + tree) / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB a device call carries")
    if total + tree + margin > LIMIT:
        raise SystemExit(f"the bundle is too large: {(total + tree) / 2**20:.1f} MiB with the checkout, limit "
                         f"{(LIMIT - margin) / 2**20:.1f} MiB (keeping {margin / 2**20:.0f} MiB spare)")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "gpu-bundle"))
    ap.add_argument("--cache", default=str(ROOT / "build" / "gpu-cache"))
    ap.add_argument("--margin-mib", type=float, default=2.0, help="room to leave under the 64 MiB carry limit")
    args = ap.parse_args(argv)
    build(Path(args.out), Path(args.cache), int(args.margin_mib * 2**20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
