#!/usr/bin/env bash
# One command for a GPU machine: CUDA tests, layer and model benchmarks, a short bf16 fine-tuning run.
#
# Runs from this working tree with PYTHONPATH (nothing is installed into the machine's
# Python); pure-Python wheels the machine lacks (e.g. jsonargparse) can be given with
# --wheels DIR and go to OUT/site with `pip install --no-deps --no-index --target`.
# Every stage has its own time limit (on a GPU all together 8 minutes at most) and writes
# OUT/<stage>.json (its results) and OUT/<stage>.status.json (command, exit code,
# seconds, the end of its output); OUT/summary.json lists the stages. A failing stage
# does not stop the next one; the exit code is 1 if any stage failed.
#
# --devices cpu runs the CPU side of every stage with tiny sizes: a dry run of the
# script itself on a machine without a GPU (tests/test_gpu_check.py does that).
set -u

usage() {
    cat <<'EOF'
usage: tools/gpu_check.sh [--out DIR] [--devices cuda|cpu] [--wheels DIR] [--quick] [-h]

  --out DIR        where the JSON results go (default: ./gpu_out)
  --devices DEV    cuda (default) or cpu (dry run of the CPU-side parts, tiny sizes)
  --wheels DIR     install the *.whl files in DIR (pure Python, no dependencies) into OUT/site
  --quick          smallest sizes on any device (seconds per stage)
  -h, --help       show this help
EOF
}

OUT=./gpu_out
DEVICE=cuda
WHEELS=
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { usage >&2; exit 2; }; OUT=$2; shift 2 ;;
        --devices) [ $# -ge 2 ] || { usage >&2; exit 2; }; DEVICE=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || { usage >&2; exit 2; }; WHEELS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda|cpu) ;;
    *) echo "gpu_check.sh: --devices must be cuda or cpu, got '$DEVICE'" >&2; usage >&2; exit 2 ;;
esac
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: --wheels $WHEELS is not a folder; give the folder holding the .whl files" >&2
    exit 2
fi
[ "$DEVICE" = cpu ] && QUICK=1

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$OUT/site:$REPO:$REPO/tools${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0
SCALE=$([ "$DEVICE" = cpu ] && echo 3 || echo 1)  # a CPU dry run is not held to the GPU's 8 minutes

# stage NAME LIMIT_S COMMAND...: run COMMAND in the repository with a time limit and record how it went.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local start
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    (cd "$REPO" && timeout --kill-after=5 "$limit" "$@") >"$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || FAILED=1
    "$PYTHON" - "$OUT/$name.status.json" "$name" "$rc" "$(($(date +%s) - start))" "$OUT/$name.log" "$@" <<'EOF'
import json, sys
path, name, rc, seconds, log, *command = sys.argv[1:]
tail = open(log, errors="replace").read()[-4000:]
status = {"stage": name, "rc": int(rc), "timed_out": int(rc) in (124, 137), "seconds": int(seconds),
          "command": command, "output_tail": tail}
json.dump(status, open(path, "w"), indent=1)
EOF
    echo "   rc=$rc"
}

if [ -n "$WHEELS" ]; then
    stage wheels 30 "$PYTHON" -m pip install --no-deps --no-index --target "$OUT/site" "$WHEELS"/*.whl
fi
stage environment 30 "$PYTHON" -c "
import json, platform, sys, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ('condconv_lightning', 'lightning', 'jsonargparse', 'timm', 'triton', 'onnxruntime'):
    try:
        module = __import__(name)
        info[name] = getattr(module, '__version__', 'present')
    except ImportError:
        info[name] = None
json.dump(info, open(sys.argv[1], 'w'), indent=1)
" "$OUT/environment.json"

if [ "$DEVICE" = cuda ]; then
    PYTEST=(tests)
else  # no CUDA test can run: check that they are found
    PYTEST=(--collect-only tests)
fi
stage pytest_cuda 70 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" "${PYTEST[@]}"

if [ "$QUICK" = 1 ]; then
    LAYERS=(--quick)
    MODEL=(--quick)
    STEPS=3
else  # fp32 runs with PyTorch's default TF32 settings; the suite's MobileNetV2 shapes are left out for time
    LAYERS=(--batch 32 128 --experts 4 8 --repeats 3 --only r50 effb0)
    MODEL=(--batch 64 --dtype bf16 --channels-last --steps 5)
    STEPS=40
fi
for dtype in fp32 bf16; do
    stage "bench_layers_$dtype" 100 "$PYTHON" tools/bench_layers.py --devices "$DEVICE" "${LAYERS[@]}" --dtype $dtype \
        --json "$OUT/bench_layers_$dtype.json"
done
stage bench_model 45 "$PYTHON" tools/bench_model.py --device "$DEVICE" "${MODEL[@]}" --json "$OUT/bench_model.json"
ACCELERATOR=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
FIT=(--trainer.accelerator "$ACCELERATOR" --trainer.devices 1 --trainer.max_steps $STEPS --trainer.precision bf16-mixed)
stage finetune 75 "$PYTHON" -m condconv_lightning.cli.finetune fit "${FIT[@]}" --trainer.enable_progress_bar false \
    --trainer.log_every_n_steps 1 --trainer.logger lightning.pytorch.loggers.CSVLogger \
    --trainer.logger.save_dir "$OUT/finetune" \
    --trainer.default_root_dir "$OUT/finetune"
"$PYTHON" - "$OUT" <<'EOF'
import csv, glob, json, os, sys
out = sys.argv[1]
rows = [row for path in sorted(glob.glob(os.path.join(out, "finetune", "**", "metrics.csv"), recursive=True))
        for row in csv.DictReader(open(path))]
last = {key: value for row in rows for key, value in row.items() if value != ""}
json.dump({"logged_rows": len(rows), "last_logged": last}, open(os.path.join(out, "finetune.json"), "w"), indent=1)
stages = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, "*.status.json")))]
summary = {s["stage"]: {"rc": s["rc"], "seconds": s["seconds"], "timed_out": s["timed_out"]} for s in stages}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
echo "results: $OUT (summary.json)"
exit $FAILED
