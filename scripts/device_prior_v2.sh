#!/usr/bin/env bash
# One device lease: fine-tune the shipped prior on world v2 (the 30 objects less the held-out five, and the
# fronted objects) and measure it, packed in $OUT/prior_v2.tgz (the device returns few files):
# - the shipped prior's `bench quality` over all 30 prompts in SHARDS processes (the comparison, same lease),
#   and its prior accuracy with the fronts check;
# - `sds3d prior train --init <shipped>` for MINUTES, then the new prior's accuracy and fronts.
# Unpack here: prior_v2/train/pipeline is the new diffusers folder (the checkpoint stays on the device).
#   [INIT=DIR] [OLD=0] bash scripts/device_prior_v2.sh MINUTES [SHARDS] [STEPS] [LR]
# INIT: the diffusers folder to start from (default the shipped prior); OLD=0 skips the shipped prior's runs;
# SNR_GAMMA: min-SNR-γ loss weighting.
set -uo pipefail
minutes=$1 shards=${2:-8} steps=${3:-8000} lr=${4:-2e-4} init=${INIT:-src/sds3d/prior/weights/world-prior-32}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; date; mkdir -p runs/prior_v2/quality_old
prompts=$(python3 -c "from sds3d.world.shapes import all_objects; print('\n'.join(o.prompt for o in all_objects()))")
[ "${OLD:-1}" = 1 ] && for i in $(seq 0 $((shards - 1))); do
  mine=$(echo "$prompts" | awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' | paste -sd, -)
  timeout -k 10 480 python3 -m sds3d.cli bench quality --device cuda --prompts "$mine" \
    --out runs/prior_v2/quality_old --name "quality_old_shard$i" > "runs/prior_v2/quality_old/shard$i.log" 2>&1 &
done
[ "${OLD:-1}" = 1 ] && { timeout -k 10 300 python3 -m sds3d.bench.prior_accuracy --camera --device cuda \
  --out runs/prior_v2 --name prior_accuracy_camera_old > runs/prior_v2/accuracy_old.log 2>&1 & }
OMP_NUM_THREADS=4 timeout -k 10 $((60 * minutes + 150)) python3 -m sds3d.cli prior train --out runs/prior_v2/train \
  --init "$init" --device cuda --compile --steps "$steps" --lr "$lr" \
  --max-minutes "$minutes" ${SNR_GAMMA:+--snr-gamma "$SNR_GAMMA"} --no-progress > runs/prior_v2/train.log 2>&1
date; tail -n 3 runs/prior_v2/train.log
timeout -k 10 150 python3 -m sds3d.bench.prior_accuracy --camera --device cuda --model runs/prior_v2/train/pipeline \
  --out runs/prior_v2 --name prior_accuracy_camera_v2 > runs/prior_v2/accuracy_v2.log 2>&1 &
# EVAL=SECONDS: meanwhile measure the new prior as the default preset's (scripts/device_prior_eval.sh).
[ -n "${EVAL:-}" ] && bash scripts/device_prior_eval.sh runs/prior_v2/train/pipeline "$EVAL" "$shards"
wait; date
tail -n 2 runs/prior_v2/*.log runs/prior_v2/quality_old/*.log 2>/dev/null | cut -c1-300
tail -n 12 runs/prior_v2/prior_accuracy_camera_*.md
tar czf "$OUT/prior_v2.tgz" -C runs --exclude=checkpoint.pt --exclude='*.ply' --exclude='*.glb' --exclude='*.obj' prior_v2
ls -la "$OUT"
