#!/usr/bin/env bash
# One device lease measuring a prior as the default preset's (it is copied over the shipped folder there):
# `sds3d bench janus --preset default` (each condition in its own process) and `bench quality` over all 30
# prompts in SHARDS processes, packed in $OUT/prior_eval.tgz; join here with
#   tar xzf prior_eval.tgz && sds3d bench janus --combine prior_eval/janus_*.json --name janus_default
#   && sds3d bench quality --combine prior_eval/quality_shard*.json --name quality_gpu
#   bash scripts/device_prior_eval.sh MODEL_DIR SECONDS [SHARDS] [SEEDS]
set -uo pipefail
model=$1 seconds=$2 shards=${3:-10} seeds=${4:-3}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
shipped=src/sds3d/prior/weights/world-prior-32
[ -d "$model/unet" ] || { echo "no prior at $model"; exit 2; }
for part in unet text_encoder tokenizer scheduler; do rm -rf "$shipped/$part"; cp -r "$model/$part" "$shipped/"; done
nvidia-smi -L; date; mkdir -p prior_eval
conditions=$(python3 -c "from sds3d.bench.janus import CONDITIONS; print(' '.join(CONDITIONS))")
for c in $conditions; do
  timeout -k 10 "$seconds" python3 -m sds3d.cli bench janus --preset default --device cuda --seeds "$seeds" \
    --conditions "$c" --out prior_eval --name "janus_$c" --image "prior_eval/janus_$c.png" > "prior_eval/janus_$c.log" 2>&1 &
done
prompts=$(python3 -c "from sds3d.world.shapes import all_objects; print('\n'.join(o.prompt for o in all_objects()))")
for i in $(seq 0 $((shards - 1))); do
  mine=$(echo "$prompts" | awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' | paste -sd, -)
  timeout -k 10 "$seconds" python3 -m sds3d.cli bench quality --device cuda --prompts "$mine" \
    --out prior_eval --name "quality_shard$i" > "prior_eval/quality_shard$i.log" 2>&1 &
done
wait; date
tail -n 2 prior_eval/*.log | cut -c1-300
python3 -m sds3d.cli bench janus --combine prior_eval/janus_*.json --out prior_eval --name janus_default \
  --image prior_eval/janus_default.png | head -14
python3 -m sds3d.cli bench quality --combine prior_eval/quality_shard*.json --out prior_eval --name quality_gpu | head -12
tar czf "$OUT/prior_eval.tgz" --exclude='*.ply' --exclude='*.glb' prior_eval
