#!/usr/bin/env bash
# The serving part's environment on the GPU host (tests/gpu/device_check.sh runs this):
#
#   bash tests/gpu/prepare_serving.sh BUNDLE WORK PYTHON
#
# - WORK/server: the trimmed tritonserver of BUNDLE/tritonserver.tar.xz (bin/, backends/python/
#   with the stub, and the libraries), laid out as in the nvidia-pytriton wheel;
# - WORK/stubenv: a venv of PYTHON whose site-packages holds BUNDLE/wheels (numpy < 2, tritonclient),
#   then PYTHON's own site-packages (torch, transformers: added after, so the bundle's numpy wins),
#   then this checkout (qwen3vl_triton). The servers' Python-backend stubs run in it
#   (EXECUTION_ENV_PATH), and so does the serving check.
#
# PREPARE_IMPORTS (default: what the serving check needs) are imported in the new environment to
# prove it; a missing library of the server or the stub is an error here, not at server start.
set -eu
BUNDLE=$1 WORK=$2 PY=$3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMPORTS=${PREPARE_IMPORTS:-numpy torch transformers transformers.generation transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe tritonclient.grpc tritonclient.utils.cuda_shared_memory qwen3vl_triton.serve.server}
# Host packages built against numpy 2 that transformers imports when it finds them (scikit-learn,
# through transformers.generation, pulls scipy): with the stubs' numpy 1.26 they fail at import, so
# the environment hides them (None in sys.modules: find_spec answers None, as if not installed).
HIDDEN=${PREPARE_HIDDEN:-sklearn scipy pandas}

[ -f "$BUNDLE/tritonserver.tar.xz" ] || { echo "no $BUNDLE/tritonserver.tar.xz: run make gpu-bundle and carry it"; exit 3; }
"$PY" - "$BUNDLE/tritonserver.tar.xz" "$WORK/server" <<'PYEOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(sys.argv[2], **kw)
PYEOF
"$PY" -m venv --without-pip "$WORK/stubenv"
site=$("$WORK/stubenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
host=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
    "$BUNDLE"/wheels/*.whl
echo "$ROOT" >"$site/qwen3vl_checkout.pth"
echo "import site; site.addsitedir('$host')" >"$site/zz_host_site_packages.pth"
hidden=$(printf '"%s",' $HIDDEN)
echo "import sys; sys.modules.update(dict.fromkeys(($hidden)))" >"$site/000_hide_numpy2_packages.pth"
# shellcheck disable=SC2086
"$WORK/stubenv/bin/python" - $IMPORTS <<'PYEOF'
import importlib, sys
for name in sys.argv[1:]:
    mod = importlib.import_module(name)
    print(f"stub env: {name} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
import numpy
assert numpy.__version__ < "2", f"numpy {numpy.__version__} from {numpy.__file__}: the 2.51 stub needs numpy < 2"
PYEOF
libdir=$("$WORK/stubenv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
stub="$WORK/server/pytriton/tritonserver/backends/python/triton_python_backend_stub"
missing=$(LD_LIBRARY_PATH="$libdir" ldd "$stub" "$WORK/server/pytriton/tritonserver/bin/tritonserver" \
    "$WORK/server/pytriton/tritonserver/backends/python/libtriton_python.so" | grep "not found" || true)
if [ -n "$missing" ]; then
    echo "libraries of the server or its stub not found (LD_LIBRARY_PATH=$libdir):"
    echo "$missing"
    exit 4
fi
echo "prepared: server in $WORK/server, stubs' environment $WORK/stubenv (libpython from $libdir)"
