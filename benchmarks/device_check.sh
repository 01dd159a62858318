#!/usr/bin/env bash
# The GPU check, one short script (well under 10 minutes on one GPU):
#   1. the quantizer benchmark (fwd+bwd, matmul limit, memory) on the device;
#   2. a 200-step `tiny` sweep of two quantizers (vq, diveq) in bf16, with its per-stage timings;
#   3. the no-host-sync tests (on CUDA: torch.cuda.set_sync_debug_mode("error") inside training steps);
#   4. the GPT sampling benchmark (KV cache vs recompute) at batch 64;
#   5. on CUDA, the paper-scale presets' step time and peak memory at their configured batch (bench_presets.py);
# and writes benchmarks/results/<device>.md (cuda.md on a GPU) with every figure and each step's exit status.
#
#   bash benchmarks/device_check.sh                 # cuda (the default)
#   bash benchmarks/device_check.sh --device cpu    # the same steps scaled down, so the script stays working
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
[[ "${1:-}" == "--device" ]] && DEVICE="${2:?--device needs cpu or cuda}"
PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT=benchmarks/results/$DEVICE
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p benchmarks/results
if [[ "$DEVICE" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""
  QUANT=(--quick) STEPS=20 LENGTHS=(64) IMAGES=64
else
  QUANT=(--variants vq,ns-vq,ns-vq-floor,diveq,simvq,transvq,transvq-floor,rotation) STEPS=200 LENGTHS=(256 1024) IMAGES=500
fi
REPORT="$OUT.md"
{
  echo "# Device check: $DEVICE"
  echo
  echo "- Date: $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); command: \`bash benchmarks/device_check.sh --device $DEVICE\`"
  echo "- $("$PY" -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"))')"
} > "$REPORT"

step() {  # step NAME COMMAND...: run it, keep its log, record its status and time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc in $((SECONDS - t0)) s" >> "$REPORT"
  tail -n 3 "$WORK/$name.log" >&2
  return 0
}

step quantizers "$PY" benchmarks/bench_quantizers.py --device "$DEVICE" "${QUANT[@]}" --out "$OUT-quantizers"
step sweep "$PY" -m study.cli sweep --output-dir "$WORK/sweep" --quantizers vq,diveq --max-steps "$STEPS" \
  eval_images=$IMAGES gfid_images=$IMAGES ref_images=$IMAGES \
  'gpt=["train.mixed_precision=bf16"]' 'ldm=["train.mixed_precision=bf16"]'
step sync_tests "$PY" -m pytest -q tests/common/test_runtime.py -k "syncs or synchronise or reads_nothing"
step sampling "$PY" benchmarks/bench_kv_cache.py --device "$DEVICE" --batch 64 --lengths "${LENGTHS[@]}" --out "$OUT-sampling"
[[ "$DEVICE" == cuda ]] && step presets "$PY" benchmarks/bench_presets.py --steps 3 --memory-gib 70 --out "$OUT-presets"

{
  echo
  echo "## Quantizers"; echo; sed -n '/^| variant/,$p' "$OUT-quantizers.md" 2>/dev/null || echo "(no result)"
  echo; echo "## Sweep ($STEPS steps per stage, vq and diveq, priors in bf16)"; echo
  for t in "$WORK"/sweep/*/timings.json; do [[ -f "$t" ]] && { echo "$(basename "$(dirname "$t")"):"; echo '```'; cat "$t"; echo; echo '```'; }; done
  sed -n '/^| /p' "$WORK/sweep/report.md" 2>/dev/null | head -n 12
  echo; echo "## No-host-sync tests"; echo; echo '```'; tail -n 3 "$WORK/sync_tests.log"; echo '```'
  echo; echo "## Sampling"; echo; sed -n '/^| /p' "$OUT-sampling.md" 2>/dev/null || echo "(no result)"
  [[ "$DEVICE" == cuda ]] && { echo; echo "## Paper-scale presets"; echo; sed -n '/^| /p' "$OUT-presets.md" 2>/dev/null || echo "(no result)"; }
} >> "$REPORT"
echo "wrote $REPORT" >&2
