#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md on a lent H100 or H200: full-size random weights in bf16 (nothing to
# download), the most wanted first, each bench under its own time limit so that one slow cell cannot eat the
# rest. Two parts, each under the device tool's 10 minutes a command:
#
#   bash scripts/gpu-checks.sh images   # LLaVA-NeXT-7B at 672x672: every method at 20%, cost against budget, batch 8
#   bash scripts/gpu-checks.sh video    # LLaVA-OneVision-7B: the video methods on 16 frames; the signal's share
#
# Each bench's table goes to $OUT/PART.log (and the screen), its rows to $OUT/NAME.csv. SMOKE=1 runs the same
# commands on the tiny models with one repeat, on any machine, to check the script before spending GPU time.
# How to run it through the device tool, wheels included: docs/BENCHMARKS.md, "Running them on a lent GPU".
set -uo pipefail
part=${1:?say images or video}
out=${OUT:-gpu-checks}
mkdir -p "$out"
log="$out/$part.log"
repeats=(--repeats 5 --warmup 2)
random=(--random-weights)
next=llava-hf/llava-v1.6-vicuna-7b-hf
onevision=llava-hf/llava-onevision-qwen2-7b-ov-hf
if [[ -n "${SMOKE:-}" ]]; then
    repeats=(--repeats 1 --warmup 0)
    random=()
    next=tiny-llava-next
    onevision=tiny-llava-onevision
fi

bench() {  # NAME SECONDS ARGS...: one bench, its rows in $out/NAME.csv, its table in the log
    local name=$1 limit=$2
    shift 2
    echo "== $name: python -m explorer bench $* (at most ${limit} s)" | tee -a "$log"
    PYTHONUNBUFFERED=1 timeout "$limit" python3 -m explorer bench "$@" "${repeats[@]}" \
        --csv "$out/$name.csv" --plot "/tmp/$name.html" 2>&1 | grep -v "Loading weights\|Writing model" | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c \
    "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
    2>&1 | tee -a "$log"

case "$part" in
images)
    bench next-7b-every-method 240 --model "$next" "${random[@]}" --image assets/coffee.jpg --sizes 672x672 \
        --budgets 0.2 --max-new-tokens 32
    bench next-7b-budgets 150 --model "$next" "${random[@]}" --image assets/coffee.jpg --sizes 672x672 \
        --methods hired,cls,random,visionzip,fastv --budgets 1,0.5,0.1,0.05 --max-new-tokens 32 --no-floor
    bench next-7b-batch 120 --model "$next" "${random[@]}" --image assets/coffee.jpg --sizes 672x672 \
        --methods hired --budgets 0.2 --batch 1,8 --max-new-tokens 32 --no-floor
    ;;
video)
    bench onevision-7b-video 330 --model "$onevision" "${random[@]}" \
        --video assets/eval-video/videos/red-moves-right.mp4 --frames 16 \
        --methods frames,uniform,random,vidcom2,evs,fastvid,holitom,dycoke --budgets 0.25,0.1 --max-new-tokens 32
    bench onevision-7b-signal 150 --model "$onevision" "${random[@]}" --image assets/coffee.jpg \
        --sizes 384x384,1152x768 --methods cls,divprune --budgets 0.2 --max-new-tokens 1 --no-floor
    ;;
*)
    echo "say images or video, not $part" >&2
    exit 2
    ;;
esac
