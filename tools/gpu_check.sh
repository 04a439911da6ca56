#!/usr/bin/env bash
# One command for a GPU machine: CUDA tests, layer and model benchmarks, a short bf16 fine-tuning run.
#
# Runs from this working tree with PYTHONPATH (nothing is installed into the machine's
# Python, and nothing needs a build backend or the network); pure-Python wheels the machine
# lacks are installed into a scratch folder with `pip install --no-deps --no-index --target`,
# from --wheels DIR. A machine with PyTorch, Lightning and torchmetrics but not this
# project's other dependencies needs these, downloaded beforehand where there is network,
# into an empty folder (one version of each) inside the checkout that git ignores, so that
# it travels with the working tree:
#
#     echo /gpu_wheels/ >> .git/info/exclude
#     pip download --no-deps -d gpu_wheels rich markdown-it-py mdurl pygments \
#         jsonargparse docstring-parser typeshed-client
#
# The environment stage lists what is missing. Every stage has its own time limit (on a
# GPU all together under 8 minutes, start-up and kill grace included) and leaves
# <stage>.json (its results) and <stage>.status.json (command, exit code, seconds, the end
# of its output) in a scratch folder. After every stage, OUT gets exactly two files, so
# that a run cut short still returns what it measured and a machine that returns only a
# few files returns all of it: OUT/summary.json (each stage's exit code and seconds) and
# OUT/results.tar.gz (every stage's files). A failing stage does not stop the next one;
# the exit code is 1 if any stage failed. The fused Triton kernels' tests run last, in
# their own stage: compiling and autotuning them for a new GPU is what takes longest (for
# that reason the layer benchmark leaves fused out; `bench_layers.py --fused` times it).
#
# --devices cpu runs the CPU side of every stage with tiny sizes: a dry run of the
# script itself on a machine without a GPU (tests/test_gpu_check.py does that).
set -u

usage() {
    cat <<'EOF'
usage: tools/gpu_check.sh [--out DIR] [--devices cuda|cpu] [--wheels DIR] [--quick] [-h]

  --out DIR        where summary.json and results.tar.gz go (default: ./gpu_out)
  --devices DEV    cuda (default) or cpu (dry run of the CPU-side parts, tiny sizes)
  --wheels DIR     install the *.whl files in DIR (pure Python, one version each) for this run
  --quick          smallest sizes on any device (seconds per stage)
  -h, --help       show this help
EOF
}

# absolute DIR: DIR as an absolute path (CDPATH unset, so that cd prints nothing)
absolute() { (CDPATH='' cd -- "$1" >/dev/null && pwd); }

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
if [ -n "$WHEELS" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check.sh: --wheels $WHEELS is not a folder; give the folder holding the .whl files" >&2
        exit 2
    fi
    WHEELS=$(absolute "$WHEELS")  # the stages run from the repository
    WHEEL_FILES=("$WHEELS"/*.whl)
    if [ ! -e "${WHEEL_FILES[0]}" ]; then
        echo "gpu_check.sh: --wheels $WHEELS holds no .whl file; download them with pip download (see the header)" >&2
        exit 2
    fi
    # pip installs nothing if two versions of one project are given: say which, before any stage runs.
    TWICE=$(for f in "${WHEEL_FILES[@]}"; do basename "$f" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; done | sort | uniq -d)
    if [ -n "$TWICE" ]; then
        echo "gpu_check.sh: --wheels $WHEELS holds more than one version of: $(echo $TWICE); keep one of each" >&2
        exit 2
    fi
fi
[ "$DEVICE" = cpu ] && QUICK=1

REPO=$(absolute "$(dirname "$0")/..")
mkdir -p "$OUT" || exit 2
OUT=$(absolute "$OUT")
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
RESULTS=$SCRATCH/results  # every stage's files; packed into OUT after each stage
mkdir -p "$RESULTS" || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
export PYTHONPATH="$SCRATCH/site:$REPO:$REPO/tools${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0
SCALE=$([ "$DEVICE" = cpu ] && echo 3 || echo 1)  # a CPU dry run is not held to the GPU's 8 minutes

# pack: OUT/summary.json (each stage's exit code, seconds, whether it timed out) and OUT/results.tar.gz
# (everything under RESULTS, with finetune.json read from the fine-tuning run's CSV log), each replaced whole.
pack() {
    "$PYTHON" - "$RESULTS" "$OUT" <<'EOF'
import csv, glob, json, os, sys, tarfile
results, out = sys.argv[1:]
rows = [row for path in sorted(glob.glob(os.path.join(results, "finetune", "**", "metrics.csv"), recursive=True))
        for row in csv.DictReader(open(path))]
if rows:
    last = {key: value for row in rows for key, value in row.items() if value != ""}
    json.dump({"logged_rows": len(rows), "last_logged": last}, open(os.path.join(results, "finetune.json"), "w"), indent=1)
stages = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(results, "*.status.json")))]
summary = {s["stage"]: {"rc": s["rc"], "seconds": s["seconds"], "timed_out": s["timed_out"]} for s in stages}
with tarfile.open(os.path.join(out, "results.tar.gz.part"), "w:gz") as archive:
    archive.add(results, arcname="results")
os.replace(os.path.join(out, "results.tar.gz.part"), os.path.join(out, "results.tar.gz"))
json.dump(summary, open(os.path.join(out, "summary.json.part"), "w"), indent=1)
os.replace(os.path.join(out, "summary.json.part"), os.path.join(out, "summary.json"))
EOF
}

# stage NAME LIMIT_S COMMAND...: run COMMAND in the repository with a time limit, record how it went, pack.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local start
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    (cd "$REPO" && timeout --kill-after=5 "$limit" "$@") >"$RESULTS/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || FAILED=1
    "$PYTHON" - "$RESULTS/$name.status.json" "$name" "$rc" "$(($(date +%s) - start))" "$RESULTS/$name.log" "$@" <<'EOF'
import json, sys
path, name, rc, seconds, log, *command = sys.argv[1:]
tail = open(log, errors="replace").read()[-4000:]
status = {"stage": name, "rc": int(rc), "timed_out": int(rc) in (124, 137), "seconds": int(seconds),
          "command": command, "output_tail": tail}
json.dump(status, open(path, "w"), indent=1)
EOF
    pack
    echo "   rc=$rc"
}

if [ -n "$WHEELS" ]; then
    stage wheels 10 "$PYTHON" -m pip install --no-deps --no-index --no-compile --upgrade --target "$SCRATCH/site" \
        "${WHEEL_FILES[@]}"
fi
# Fails (and says what to download) if a module the stages need is missing; optional ones are listed.
stage environment 20 "$PYTHON" -c "
import importlib, json, platform, sys, torch
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}
needed = ('condconv_lightning', 'lightning', 'torchmetrics', 'rich', 'jsonargparse', 'docstring_parser',
          'typeshed_client', 'pytest')
for name in (*needed, 'timm', 'triton', 'onnxruntime', 'hypothesis'):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, '__version__', 'present')
    except Exception as error:  # ImportError, or a package that fails beside this torch
        info[name] = None
        info[name + '_error'] = str(error).splitlines()[0] if str(error) else type(error).__name__
json.dump(info, open(sys.argv[1], 'w'), indent=1)
missing = [name for name in needed if info[name] is None]
if missing:
    sys.exit('missing: ' + ', '.join(missing) + '; bring their wheels with --wheels (see the header of gpu_check.sh)')
" "$RESULTS/environment.json"

# Test files are named, so that a module a non-CUDA test file needs cannot stop collection.
CUDA_TESTS=(tests/test_reference.py tests/test_condconv2d.py tests/test_perf_bench.py)
FUSED_TESTS=(
    "tests/test_fused.py::test_matches_reference_cuda[multi-tile]"
    "tests/test_fused.py::test_matches_reference_cuda[groups2-stride2-dilation2-nhwc]"
    "tests/test_fused.py::test_matches_reference_cuda[bf16-autocast]"
    tests/test_fused.py::test_gradients_are_deterministic
)
if [ "$DEVICE" = cpu ]; then  # no CUDA test can run: check that they are found
    CUDA_TESTS=(--collect-only "${CUDA_TESTS[@]}")
    FUSED_TESTS=(--collect-only "${FUSED_TESTS[@]}")
fi
PYTEST=("$PYTHON" -m pytest -m cuda -v -p no:cacheprovider --continue-on-collection-errors)
stage pytest_cuda 55 "${PYTEST[@]}" --junitxml="$RESULTS/pytest_cuda.xml" "${CUDA_TESTS[@]}"

if [ "$QUICK" = 1 ]; then
    LAYERS=(--quick)
    MODEL=(--quick)
    DISPATCH=(--quick)
    STEPS=3
else  # fp32 with PyTorch's default TF32 settings; one shape of each kind (event timing needs few rounds).
    # Every strategy auto can choose; not the opt-in fused, whose Triton kernels would compile and autotune
    # anew for each shape, dtype and K (over a minute per dtype), more than the stage's limit.
    SHAPES=("r50.conv1" "r50.layer1 3x3" "r50.layer3 1x1 1024->256" "r50.layer3 3x3 256" "r50.layer4 3x3 512"
        "r50.layer4 1x1/2" "mbv2.stage2 dw3x3/2" "effb0.stage6 dw5x5/2")
    LAYERS=(--batch 32 128 --experts 4 8 --repeats 3 --min-total-ms 50 --only "${SHAPES[@]}")
    MODEL=(--batch 64 --dtype bf16 --channels-last --steps 5)
    DISPATCH=(--rounds 11 --sample-ms 10)
    STEPS=40
fi
for dtype in fp32 bf16; do
    stage "bench_layers_$dtype" 70 "$PYTHON" tools/bench_layers.py --devices "$DEVICE" "${LAYERS[@]}" --dtype $dtype \
        --json "$RESULTS/bench_layers_$dtype.json"
done
stage bench_model 45 "$PYTHON" tools/bench_model.py --device "$DEVICE" "${MODEL[@]}" --json "$RESULTS/bench_model.json"
stage bench_dispatch 10 "$PYTHON" tools/bench_dispatch.py --device "$DEVICE" "${DISPATCH[@]}" \
    --json "$RESULTS/bench_dispatch.json"
ACCELERATOR=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
FIT=(--trainer.accelerator "$ACCELERATOR" --trainer.devices 1 --trainer.max_steps $STEPS --trainer.precision bf16-mixed)
stage finetune 70 "$PYTHON" -m condconv_lightning.cli.finetune fit "${FIT[@]}" --trainer.enable_progress_bar false \
    --trainer.log_every_n_steps 1 --trainer.logger lightning.pytorch.loggers.CSVLogger \
    --trainer.logger.save_dir "$RESULTS/finetune" \
    --trainer.default_root_dir "$RESULTS/finetune"
stage pytest_fused 80 "${PYTEST[@]}" --junitxml="$RESULTS/pytest_fused.xml" "${FUSED_TESTS[@]}"
echo "results: $OUT/summary.json, $OUT/results.tar.gz"
exit $FAILED
