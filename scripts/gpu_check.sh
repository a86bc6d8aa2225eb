#!/usr/bin/env bash
# The one prepared check for a machine with a CUDA GPU (under 8 minutes on one GPU):
#   1. the GPU-marked tests (tests/test_gpu.py: bit-identical reruns, fp16/bf16, FP8 on 8.9+, one job per GPU,
#      evaluate reproducing test.top1; gpt_micro in fp32 and bf16 rerun bit for bit, evaluate reproducing test.loss);
#   2. the benchmark's GPU rows (deit_tiny at 224 and resnet8 at 32, bf16/fp32 img/s with MFU against the
#      bf16 peak; trainer.compile on/off; precision=fp8 against bf16 on 8.9+).
# Writes <folder>/gpu_check.json (tests + benchmark rows) and <folder>/gpu_check.log, and prints the folder.
#
#   bash scripts/gpu_check.sh [folder]      # default: multirun/gpu_check/<date>_<time>
#
# Without a CUDA device it says so and exits 0. Exit 1 when a test failed or a part did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device on this machine; nothing to check."
  exit 0
fi
out="${1:-multirun/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"
log="$out/gpu_check.log"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{
  echo "== gpu_check $(date -Is) on $(hostname)"
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>&1 || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== GPU-marked tests"
  timeout 200 python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/.tests.xml" tests
  echo "tests exit: $?"
  echo "== benchmark GPU rows"
  timeout 260 python -m stackwise_bench.bench --quick --only gpu --out "$out/.benchmark.json"
  echo "benchmark exit: $?"
} 2>&1 | tee "$log"

python - "$out" <<'PY'
import json, pathlib, sys, xml.etree.ElementTree as ET

out = pathlib.Path(sys.argv[1])
tests = {"passed": [], "failed": [], "skipped": []}
if (out / ".tests.xml").exists():
    for case in ET.parse(out / ".tests.xml").iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        tests[kind].append(name)
bench = json.loads((out / ".benchmark.json").read_text()) if (out / ".benchmark.json").exists() else None
report = {"tests": tests, "benchmark": bench, "complete": bench is not None and (out / ".tests.xml").exists()}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
for name in (".tests.xml", ".benchmark.json"):
    (out / name).unlink(missing_ok=True)
print(f"gpu_check: {len(tests['passed'])} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped; "
      f"benchmark {'written' if bench else 'MISSING'} -> {out}/gpu_check.json")
sys.exit(0 if report["complete"] and not tests["failed"] else 1)
PY
