#!/usr/bin/env bash
# One device lease: fine-tune the shipped prior in several variants at once (the 4 M-parameter model leaves
# the GPU mostly idle, so they share it), then each one's prior accuracy with the fronts check at camera
# guidance scales CG (default 0,2,5). Each variant comes back as $OUT/NAME.tgz (its diffusers folder
# NAME/train/pipeline, train log and reports; the checkpoint stays on the device).
#   [INIT=DIR] [CG=0,2,5] bash scripts/device_prior_sweep.sh MINUTES STEPS LR "NAME:TRAIN ARGS" ...
# e.g. bash scripts/device_prior_sweep.sh 6 20000 3e-4 "high50:--fronted-high-t 0.5" "high90:--fronted-high-t 0.9"
set -uo pipefail
minutes=$1 steps=$2 lr=$3; shift 3
init=${INIT:-src/sds3d/prior/weights/world-prior-32}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi -L; date
for spec in "$@"; do
  name=${spec%%:*} extra=${spec#*:}; mkdir -p "runs/$name"
  # shellcheck disable=SC2086  # the variant's arguments split into words
  ( timeout -k 10 $((60 * minutes + 150)) python3 -m sds3d.cli prior train --out "runs/$name/train" --init "$init" \
      --device cuda --compile --steps "$steps" --lr "$lr" --max-minutes "$minutes" $extra --no-progress \
      > "runs/$name/train.log" 2>&1
    timeout -k 10 200 python3 -m sds3d.bench.prior_accuracy --camera --device cuda --camera-guidance "${CG:-0,2,5}" \
      --model "runs/$name/train/pipeline" --out "runs/$name" --name "prior_accuracy_$name" > "runs/$name/accuracy.log" 2>&1
    tar czf "$OUT/$name.tgz" -C runs --exclude=checkpoint.pt "$name" ) &
done
wait; date
for spec in "$@"; do
  name=${spec%%:*}; echo "== $name"; tail -n 2 "runs/$name/train.log" | cut -c1-300
  tail -n 2 "runs/$name/accuracy.log" | cut -c1-300; tail -n 9 "runs/$name/prior_accuracy_$name.md"
done
ls -la "$OUT"
