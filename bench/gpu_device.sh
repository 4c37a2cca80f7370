#!/usr/bin/env bash
# Issue 18, goal 7: every GPU check in one script, for a machine with a CUDA GPU and the project's Python packages
# importable (an installed .venv, or wheels unpacked onto PYTHONPATH). Each step runs under its own time limit and
# the next one runs whatever the last did; every result is a JSON line in OUT/gpu.jsonl, every console a log in OUT.
# bench/gpu_readme.py turns the JSON lines into the README's "GPU figures" section.
#
# Usage, from the repository root: [MAMMO_COMMIT=$(git rev-parse --short HEAD)] bash bench/gpu_device.sh OUT [PYTHON]
# STEPS (default "tests detect pipeline") picks the checks, so that a lease of a few minutes can split them over
# calls; RUNS (default "shared separate") the pipeline runs, SHARED_S / SEPARATE_S bound them (default 420 / 150 s),
# REPEATS the latency rounds.
set -u
out=${1:?usage: bash bench/gpu_device.sh OUT [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
jsonl="$out/gpu.jsonl"
: >"$jsonl"
say() { echo "== $(date -u +%H:%M:%S) $*"; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/nvidia-smi.txt"
timeout 60 "$py" - <<'EOF' | tee -a "$jsonl"
import datetime, json, os, platform, torch
print(json.dumps({"bench": "machine", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                  "cpu_cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
                  "commit": os.environ.get("MAMMO_COMMIT", "?")}))
EOF

steps=" ${STEPS:-tests detect pipeline} "
if [[ $steps == *" tests "* ]]; then
say "CUDA tests"
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/core/detection/test_cuda_graphs.py \
    tests/core/training/test_devices.py >"$out/pytest.log" 2>&1
tail -3 "$out/pytest.log"
"$py" - "$out/pytest.log" <<'EOF' | tee -a "$jsonl"
import json, re, sys
text = open(sys.argv[1]).read()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text.splitlines()[-1] if text else "")}
print(json.dumps({"bench": "cuda_tests", "command": "python -m pytest tests/core/detection/test_cuda_graphs.py "
                  "tests/core/training/test_devices.py", **counts}))
EOF

fi

if [[ $steps == *" detect "* ]]; then
say "detector latency at batch 1 (paper sizes)"
timeout 150 "$py" bench/detect.py --params params/paper_phantom.yaml --repeats "${REPEATS:-30}" >>"$jsonl" 2>"$out/detect.log"
tail -c 600 "$jsonl"; echo

fi

if [[ $steps == *" pipeline "* ]]; then
say "pipeline on the GPU: shared trunk, then separate on one GPU"
"$py" bench/gpu_pipeline.py -p params/paper_phantom.yaml --store "${GPU_STORE:-/tmp/mammo-gpu-store}" \
    --log-dir "$out" --runs ${RUNS:-shared separate} --timeout-s "${SHARED_S:-420}" "${SEPARATE_S:-150}" \
    >>"$jsonl" 2>"$out/gpu_pipeline.log"
tail -c 1500 "$jsonl"; echo
fi
say "done"
