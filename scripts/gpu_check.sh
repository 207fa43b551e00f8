#!/usr/bin/env bash
# The GPU check, in one command, on a machine with one NVIDIA GPU and a Python that has
# torch (CUDA), safetensors, xxhash, click, tqdm, prometheus-client and pytest: nothing is
# installed or fetched. Runs the project from src/ (PYTHONPATH), the GPU-marked tests
# (`pytest -m gpu`) and the new CPU unit tests, then benchmarks/bench_gpu.py, and writes
# every figure into one JSON file: $GPU_CHECK_OUT (or $OUT, or runs/gpu_check)/gpu_check.json.
# Budget: under 8 minutes (GPU tests at most 240 s, unit tests 60 s, benchmark 150 s).
#
#   bash scripts/gpu_check.sh            # PYTHON=python3 by default
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-${OUT:-$root/runs/gpu_check}}
mkdir -p "$out"
started=$(date +%s)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "gpu_check: $*" >&2; }

if ! "$python" -c 'import torch, safetensors, xxhash, click, tqdm, prometheus_client, pytest' \
    2>"$out/imports.log"; then
  say "missing a package (see $out/imports.log)"; cat "$out/imports.log" >&2; exit 2
fi
# GPU_CHECK_ALLOW_CPU=1: run the plumbing without a GPU (every GPU test then skips).
if ! "$python" - <<'EOF' >&2; then
import os, sys, torch
print("gpu_check: torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
sys.exit(0 if torch.cuda.is_available() or os.environ.get("GPU_CHECK_ALLOW_CPU") else 1)
EOF
  say "torch sees no CUDA device: nothing to check here"; exit 2
fi

# The tests' helpers start `netloader` by name: a shim that runs it from src/.
bin=$(mktemp -d)
pyexe=$("$python" -c 'import sys; print(sys.executable)')
cat >"$bin/netloader" <<SHIM
#!/bin/sh
exec "$pyexe" -c 'import sys; sys.argv[0] = "netloader"; from netloader.cli import main; main()' "\$@"
SHIM
chmod +x "$bin/netloader"
export PATH="$bin:$PATH"

say "pytest -m gpu (and the device digest / CUDA IPC / server ring unit tests)"
timeout 240 "$python" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider \
  --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
gpu_rc=${PIPESTATUS[0]}
timeout 60 "$python" -m pytest -q -p no:cacheprovider --junitxml="$out/unit_tests.xml" \
  tests/unit/test_device_digest.py tests/unit/test_cuda_ipc.py tests/unit/test_server_ring.py \
  tests/unit/test_sink.py tests/test_device_paths.py \
  2>&1 | tee "$out/unit_tests.log"
unit_rc=${PIPESTATUS[0]}

say "benchmarks/bench_gpu.py"
timeout 150 "$python" benchmarks/bench_gpu.py --gib 2 --repeat 3 --json "$out/bench_gpu.json" \
  2>&1 | tee "$out/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

"$python" - "$out" "$gpu_rc" "$unit_rc" "$bench_rc" "$started" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, gpu_rc, unit_rc, bench_rc, started = Path(sys.argv[1]), *map(int, sys.argv[2:])

def junit(name):
    path = out / name
    if not path.exists():
        return {"ran": False}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = kind
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time", 0))})
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failure", "error", "skipped")}
    return {"ran": True, "counts": counts, "cases": cases}

bench = out / "bench_gpu.json"
result = {
    "seconds": round(time.time() - started, 1),
    "exit_status": {"gpu_tests": gpu_rc, "unit_tests": unit_rc, "bench": bench_rc},
    "gpu_tests": junit("gpu_tests.xml"),
    "unit_tests": junit("unit_tests.xml"),
    "bench": json.loads(bench.read_text()) if bench.exists() else None,
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("seconds", "exit_status")}
                 | {"gpu_counts": result["gpu_tests"].get("counts")}, indent=2))
EOF
say "figures in $out/gpu_check.json ($(( $(date +%s) - started )) s)"
[ "$gpu_rc" = 0 ] && [ "$unit_rc" = 0 ] && [ "$bench_rc" = 0 ]
