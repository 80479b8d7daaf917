#!/usr/bin/env bash
# The GPU checks of this project, in one run on a GPU host (an H200 or any sm_90 device with
# Python 3.12, torch with CUDA and nvcc), each part on its own:
#
#   1. kernel   the DeepstackAdd CUDA kernel built with nvcc, against torch on the device
#               (fp32/fp16/bf16, odd sizes, stride > n, text rows, slots past the table)
#   2. timing   the kernel against one Qwen3-VL-30B-A3B-sized decoder layer in torch
#   3. serving  encoder + language tritonservers, the prompt table through CUDA shared memory,
#               bytes and tokens against the CPU path on the tiny checkpoint
#
# Usage (from the checkout, after `make gpu-bundle` here; build/gpu-bundle travels with it):
#
#   bash tests/gpu/device_check.sh OUT_DIR
#
# Writes OUT_DIR/{env,kernel,timing,serving,report}.json, OUT_DIR/log.txt (this output) and
# OUT_DIR/serving.log (the servers' logs). Every part prints PASS, FAIL or SKIP with its figures
# and reason; a part that fails or times out does not stop the next. Exit status 0 when no part
# failed. Environment: GPU_BUNDLE (build/gpu-bundle), DEVICE_CHECK_WORK (scratch, /tmp/...),
# DEVICE_CHECK_BUDGET (seconds for the whole run, 480), PYTHON (python3), CUDA_ARCH (90).
set -u

OUT=${1:?usage: device_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-$ROOT/build/gpu-bundle}
WORK=${DEVICE_CHECK_WORK:-/tmp/qwen3vl-device-check}
BUDGET=${DEVICE_CHECK_BUDGET:-480}
rm -rf "$WORK"
mkdir -p "$WORK"

say() { echo "[device_check ${SECONDS}s] $*"; }

# seconds a part may take: its cap, or what is left of the budget (less 20 s to write the report)
limit() {
    local cap=$1 left=$((BUDGET - SECONDS - 20))
    ((left < cap)) && cap=$left
    ((cap < 5)) && cap=5
    echo "$cap"
}

# a part's report when the part itself wrote none (killed at its limit, crashed before writing)
fallback_report() { # name status reason
    local reason
    reason=$(printf '%s' "$3" | tr '\n\t"\\' "  '/")
    printf '{"part": "%s", "status": "%s", "reason": "%s", "figures": {}, "checks": []}\n' "$1" "$2" "$reason" \
        >"$OUT/$1.json"
    echo "== $1: $2 -- $reason"
}

# run_part NAME CAP COMMAND...: the command under `timeout`, a fallback report if it wrote none
run_part() {
    local name=$1 cap rc
    cap=$(limit "$2")
    shift 2
    say "== $name: start (limit ${cap}s)"
    timeout -k 10 "$cap" "$@"
    rc=$?
    if [ ! -s "$OUT/$name.json" ]; then
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            fallback_report "$name" FAIL "timed out after ${cap}s (see log.txt)"
        else
            fallback_report "$name" FAIL "exited with status $rc before writing its report (see log.txt)"
        fi
    fi
    say "== $name: done (exit $rc)"
}

# ---- 0. the host -------------------------------------------------------------------------------
say "checkout $ROOT, bundle $BUNDLE, work $WORK, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -4
"$PY" - "$OUT/env.json" "$BUNDLE" <<'EOF'
import json, os, platform, shutil, subprocess, sys, sysconfig
out, bundle = sys.argv[1:]
env = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
       "libdir": sysconfig.get_config_var("LIBDIR"), "ldlibrary": sysconfig.get_config_var("LDLIBRARY")}
libpy = os.path.join(env["libdir"] or "", f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0")
env["libpython_found"] = os.path.isfile(libpy) and libpy
for name in ("torch", "numpy", "transformers", "tokenizers", "cuda.bindings", "grpc", "google.protobuf"):
    try:
        mod = __import__(name, fromlist=["_"])
        env[name] = getattr(mod, "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        env[name] = f"missing: {type(exc).__name__}: {exc}"
try:
    import torch
    env["cuda"] = torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability()) if env["device"] else None
except Exception as exc:  # noqa: BLE001
    env["device"] = f"error: {exc}"
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as exc:  # noqa: BLE001
    env["nvcc"] = f"missing: {exc}"
manifest = os.path.join(bundle, "MANIFEST.json")
env["bundle"] = json.load(open(manifest))["requirements"] if os.path.isfile(manifest) else "missing"
ok = bool(env.get("device")) and not str(env["device"]).startswith("error") and "missing" not in str(env["nvcc"])
report = {"part": "env", "status": "PASS" if ok else "FAIL",
          "reason": "" if ok else "no CUDA device seen by torch, or no nvcc", "figures": env, "checks": []}
json.dump(report, open(out, "w"), indent=1)
for k, v in env.items():
    print(f"  {k}: {v}")
print(f"== env: {report['status']}" + (f" -- {report['reason']}" if report["reason"] else ""))
EOF

# ---- serving's preparation, in the background while the kernel builds ----------------------------
bash tests/gpu/prepare_serving.sh "$BUNDLE" "$WORK" "$PY" >"$WORK/prepare.log" 2>&1 &
PREPARE_PID=$!

# ---- the kernel, built once for parts 1 and 2 ------------------------------------------------------
LIB=""
say "building the kernel with nvcc for sm_${CUDA_ARCH:-90}"
if timeout -k 10 "$(limit 180)" "$PY" -m tests.gpu.deepstack_gpu build --out "$WORK/kernel"; then
    LIB="$WORK/kernel/libdeepstack_capi.so"
else
    say "the kernel build failed: parts 1 and 2 report it"
fi

# ---- 1. kernel ---------------------------------------------------------------------------------
run_part kernel 120 "$PY" -m tests.gpu.deepstack_gpu check ${LIB:+--lib "$LIB"} --report "$OUT/kernel.json"

# ---- 2. timing ---------------------------------------------------------------------------------
run_part timing 150 "$PY" -m tests.gpu.timing ${LIB:+--lib "$LIB"} --report "$OUT/timing.json"

# ---- 3. serving through CUDA shared memory -------------------------------------------------------
say "waiting for serving's preparation"
wait "$PREPARE_PID"
PREPARED=$?
cat "$WORK/prepare.log"
if [ "$PREPARED" = 0 ]; then
    run_part serving 270 env TRITONSERVER="$WORK/server/pytriton/tritonserver/bin/tritonserver" \
        SERVER_START_TIMEOUT=120 "$WORK/stubenv/bin/python" -m tests.gpu.serving --work "$WORK/serving" \
        --report "$OUT/serving.json"
else
    fallback_report serving FAIL "preparing the server and the stubs' environment failed (exit $PREPARED): $(tail -n 3 "$WORK/prepare.log" | tr '\n"' ' ' | cut -c1-400)"
fi
{
    echo "### prepare.log"
    cat "$WORK/prepare.log"
    for log in "$WORK"/serving/*/tritonserver.log; do
        [ -f "$log" ] || continue
        echo "### $log (last 300 lines)"
        tail -n 300 "$log"
    done
} >"$OUT/serving.log" 2>&1

# ---- the report ------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
parts, worst = {}, 0
for name in ("env", "kernel", "timing", "serving"):
    path = os.path.join(out, f"{name}.json")
    try:
        parts[name] = json.load(open(path))
    except Exception as exc:  # noqa: BLE001
        parts[name] = {"part": name, "status": "FAIL", "reason": f"no report: {exc}"}
json.dump(parts, open(os.path.join(out, "report.json"), "w"), indent=1)
print("\n==== device check summary")
for name, p in parts.items():
    figures = p.get("figures", {})
    keys = {"kernel": ["cases"], "timing": ["copy_bandwidth_GBps", "layer_prefill_ms", "layer_decode_ms",
            "kernel_prefill_us", "kernel_prefill_GBps", "ratio_prefill_percent", "kernel_decode_us",
            "ratio_decode_percent", "ratio_prefill_per_forward_percent", "moe_impl"],
            "serving": ["numpy", "torch", "transformers", "servers_start_s"], "env": ["device", "python", "torch"]}[name]
    shown = ", ".join(f"{k}={figures[k]}" for k in keys if k in figures)
    print(f"{name:8s} {p.get('status', '?'):4s} {p.get('reason', '')} {('[' + shown + ']') if shown else ''}")
    if p.get("status") == "FAIL":
        worst = 1
sys.exit(worst)
EOF
STATUS=$?
say "finished (exit $STATUS)"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1
exit "$STATUS"
