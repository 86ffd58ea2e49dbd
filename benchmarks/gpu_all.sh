#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md on one GPU (sized for an H200: <= 8 minutes), in one JSON file.
#
#   benchmarks/gpu_all.sh [OUT.json]          # the paper's shapes on the GPU
#   benchmarks/gpu_all.sh OUT.json --tiny     # tiny shapes on the CPU (what the tests run)
#
# Steps (each under its own time limit; one failing does not stop the others):
#   group          benchmarks/group_gpu.py: exact top-30 of 566,747 clustered 512-d vectors, fp32 and bf16
#   render         benchmarks/render_gpu.py --compile --channels-last --fuse-qkv: icsd render vs the
#                  reference loop (SD-1.5 shapes, 512 px, 20 DPM-Solver++ steps, CFG 7.5, random weights)
#   train          benchmarks/train_gpu.py: icsd trainer (data path included) vs the fp32 eager reference
#   train_grouped  the same with image-grouped steps, 7 captions per image
#
# Works offline. Expects on the machine: torch (CUDA), transformers, sentence-transformers, pyarrow,
# pillow, numpy, pyyaml. Whatever else the steps import and the machine lacks is installed with
# `pip install --no-index --no-deps` from wheels beside this script (benchmarks/wheels/, or
# $ICSD_WHEELS): diffusers, webdataset, braceexpand, pydantic, pydantic-core (built for this
# Python), annotated-types, typing-inspection, importlib-metadata, zipp.
# benchmarks/fetch_wheels.sh downloads them on a machine with network. icsd itself runs from src/.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
OUT="$(realpath -m "${1:-gpu_all.json}")"
TINY="${2:-}"
WHEELS="${ICSD_WHEELS:-$HERE/wheels}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO/src:$HERE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"diffusers": "diffusers", "webdataset": "webdataset", "braceexpand": "braceexpand", "pydantic": "pydantic",
          "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
          "typing_inspection": "typing-inspection", "importlib_metadata": "importlib-metadata", "zipp": "zipp"}
print(" ".join(wheel for module, wheel in needed.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "installing from $WHEELS: $missing"
  if ! "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" $missing; then
    echo "gpu_all: cannot install $missing offline; put their wheels in $WHEELS (benchmarks/fetch_wheels.sh)" >&2
    exit 2
  fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >"$WORK/$name.status"
}

cd "$REPO"
if [ "$TINY" = "--tiny" ]; then
  step group 120 "$PY" "$HERE/group_gpu.py" --n 3000 --dim 64 --device cpu --block-size 512 --json "$WORK/group.json"
  step render 300 "$PY" "$HERE/render_gpu.py" --tiny --json "$WORK/render.json"
  step train 300 "$PY" "$HERE/train_gpu.py" --tiny --steps 2 --warmup 1 --images 16 --json "$WORK/train.json"
  step train_grouped 300 "$PY" "$HERE/train_gpu.py" --tiny --steps 2 --warmup 1 --images 16 \
    --group-captions --captions-per-image 7 --json "$WORK/train_grouped.json"
else
  step group 90 "$PY" "$HERE/group_gpu.py" --json "$WORK/group.json"
  step render 200 "$PY" "$HERE/render_gpu.py" --compile --channels-last --fuse-qkv --json "$WORK/render.json"
  step train 90 "$PY" "$HERE/train_gpu.py" --steps 40 --warmup 10 --images 1024 --json "$WORK/train.json"
  step train_grouped 90 "$PY" "$HERE/train_gpu.py" --steps 40 --warmup 10 --images 1024 \
    --group-captions --captions-per-image 7 --json "$WORK/train_grouped.json"
fi

"$PY" - "$WORK" "$OUT" "$START" "$TINY" <<'EOF'
import json, sys, time
from pathlib import Path

work, out, start, tiny = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "--tiny"
result = {"shapes": "tiny" if tiny else "paper", "wall_s": int(time.time()) - start, "steps": {}}
for name in ("group", "render", "train", "train_grouped"):
    status = work / f"{name}.status"
    entry = json.loads(status.read_text()) if status.exists() else {"rc": None}
    data = work / f"{name}.json"
    entry["result"] = json.loads(data.read_text()) if data.exists() else None
    log = work / f"{name}.log"
    entry["log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    result["steps"][name] = entry
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu_all: {out} ({result['wall_s']} s); rc per step:",
      {k: v["rc"] for k, v in result["steps"].items()})
EOF
