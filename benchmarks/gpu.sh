#!/usr/bin/env bash
# The GPU checks in one go, for a machine whose python holds a CUDA build of torch (make's .venv holds
# the CPU build, so this script does not use it) and possibly no network: moeify from this checkout on
# PYTHONPATH (passes/ placed as moeify.passes, as the wheel installs it), the CUDA tests, the layer's
# parts against their alternatives, then the layer benchmark. Logs and the results file go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu.sh [moe_layer.py options]    # e.g. --no-compile, --tokens 4096,8192
#   PYTHON=/path/to/python SKIP_TESTS=1 SKIP_PARTS=1 SKIP_BENCH=1 BENCH_TIMEOUT=900 bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
cp -r moeify "$site/moeify" && cp -r passes "$site/moeify/passes" || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
"$py" - <<'PY' 2>&1 | tee "$out/gpu_env.txt"
import torch, torch.nn.functional as F
import moeify
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
      "capability", torch.cuda.get_device_capability())
print("F.grouped_mm", hasattr(F, "grouped_mm"), "torch._grouped_mm", hasattr(torch, "_grouped_mm"))
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError as e:
    print("onnxruntime missing:", e)
print("moeify from", moeify.__file__)
PY
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  # -P: the checkout's own moeify/ (without passes/) must not shadow the copy on PYTHONPATH
  "$py" -P -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log"
  status=${PIPESTATUS[0]}
fi
if [ -z "${SKIP_PARTS:-}" ]; then
  timeout "${PARTS_TIMEOUT:-900}" "$py" benchmarks/moe_parts.py --out "$out/moe_parts_cuda.txt" 2>&1 | tee "$out/moe_parts_cuda.log"
fi
bench=0
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_TIMEOUT:-1800}" "$py" benchmarks/moe_layer.py --device cuda --out "$out/moe_layer_cuda.txt" "$@" \
    2>&1 | tee "$out/moe_layer_cuda.log"
  bench=${PIPESTATUS[0]}
fi
[ "$status" -ne 0 ] && exit "$status"
exit "$bench"
