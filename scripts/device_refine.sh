#!/usr/bin/env bash
# One device lease of `sds3d bench quality --refine` over all 30 prompts, in SHARDS processes at once
# on one GPU (disjoint prompt sets), the reports packed in $OUT/refine.tgz (the device returns few files);
# unpack it and join them here with
#   tar xzf refine.tgz && sds3d bench quality --combine refine/quality_refine_shard*.json --name quality_refine
#   bash scripts/device_refine.sh SHARDS SECONDS
set -uo pipefail
shards=$1 seconds=$2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; date; mkdir -p refine
prompts=$(python3 -c "from sds3d.world.shapes import all_objects; print('\n'.join(o.prompt for o in all_objects()))")
for i in $(seq 0 $((shards - 1))); do
  mine=$(echo "$prompts" | awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' | paste -sd, -)
  timeout -k 10 "$seconds" python3 -m sds3d.cli bench quality --device cuda --refine --prompts "$mine" \
    --out refine --name "quality_refine_shard$i" > "refine/shard$i.log" 2>&1 &
done
wait; date
tail -n 2 refine/shard*.log | cut -c1-300
tar czf "$OUT/refine.tgz" refine
