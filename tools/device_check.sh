#!/usr/bin/env bash
# The GPU checks of the issue "Calibration and serving at the speed of the hardware", prepared as
# one run for a lent device machine (a lease is 15 minutes, a command at most 10): nothing has run
# on CUDA yet, so the first run must say as much as it can in one go.
#
#   OUT=/some/folder tools/device_check.sh [STAGE ...]      (from the repository root)
#
# Stages, in this order by default (each under its own time limit, so one that hangs or fails
# does not take the others with it; every figure lands under $OUT, default ./device-out):
#   env     the machine: nvidia-smi, Python, torch, CUDA                        -> env.txt
#   quick   `kgml-peft bench --quick` (same keys, rough figures: fails fast)    -> bench-quick.json
#   plain   IA of `kgml-peft synth`, `calibrate --cv none`, wall time           -> calibrate.txt
#   bench   `kgml-peft bench` with its defaults                                 -> bench.json
#   tests   the day-loop, batched, cross-validation and multi-process tests     -> tests.txt
#   cv      IA with the default cross-validation (not by default: a second run) -> calibrate.txt
# stages.txt (and the console) get one line per stage: its exit code and seconds; the script exits
# 1 if any stage failed. The image's python3 has torch, peft, accelerate and the rest; the project
# runs from the tree (PYTHONPATH), not installed. On a machine with one GPU the multi-process tests
# put two processes on that GPU: a failure there says what that costs, not that the change broke.
set -uo pipefail

OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEMO=${TMPDIR:-/tmp}/device-check-demo.csv
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env quick plain bench tests)
for stage in "${stages[@]}"; do  # every name checked before anything runs
    case $stage in
    env | quick | plain | bench | tests | cv) ;;
    *) echo "unknown stage '$stage' (env, quick, plain, bench, tests, cv)" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec 3>&1  # the console, for the stage lines (each stage's own output goes to its files)
failed=0

KGML=("$PY" -m kgml_peft)  # an array, not a function: `timeout` runs commands, not functions

# run LIMIT NAME COMMAND...: one stage under `timeout`, its exit code and seconds in stages.txt
run() {
    local limit=$1 name=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "$name: exit $rc, $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/stages.txt" >&3
    [ $rc -eq 0 ] || failed=1
    return $rc
}

demo() {  # the process-model demo table, made once per machine
    [ -f "$DEMO" ] || run 180 synth "${KGML[@]}" synth --out "$DEMO" >> "$OUT/calibrate.txt" 2>&1
}

for stage in "${stages[@]}"; do
    case $stage in
    env)
        run 60 env bash -c '{ nvidia-smi; "$0" -c "import sys, torch
print(sys.version)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")"; nproc; } > "$1/env.txt" 2>&1' "$PY" "$OUT" ;;
    quick)
        run 150 quick "${KGML[@]}" bench --quick --quiet --json --out "$OUT/bench-quick.json" --force > /dev/null 2> "$OUT/bench-quick.err" ;;
    plain)
        demo
        run 240 plain "${KGML[@]}" calibrate --data "$DEMO" --site IA --cv none --out "$WORK/plain" --force >> "$OUT/calibrate.txt" 2>&1 ;;
    bench)
        run 300 bench "${KGML[@]}" bench --quiet --json --out "$OUT/bench.json" --force > /dev/null 2> "$OUT/bench.err" ;;
    tests)
        run 180 tests "$PY" -m pytest -q -x -p no:cacheprovider tests/test_native_loop.py tests/test_batched.py \
            tests/test_cv.py tests/test_multiprocess.py > "$OUT/tests.txt" 2>&1 ;;
    cv)
        demo
        run 400 cv "${KGML[@]}" calibrate --data "$DEMO" --site IA --out "$WORK/cv" --force >> "$OUT/calibrate.txt" 2>&1 ;;
    esac
done
exit $failed
