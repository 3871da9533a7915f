#!/usr/bin/env bash
# One device lease of `sds3d bench quality` over all 30 prompts, in SHARDS processes at once on one GPU
# (disjoint prompt sets), the reports packed in $OUT/NAME.tgz (the device returns few files); unpack it
# and join them here with
#   tar xzf NAME.tgz && sds3d bench quality --combine NAME/NAME_shard*.json --name NAME
#   [PRESET=default] [REFINE=1] [NAME=quality_refine] bash scripts/device_refine.sh SHARDS SECONDS
# The default: the default preset with the refine stage after each prompt (--refine).
set -uo pipefail
shards=$1 seconds=$2 preset=${PRESET:-default} name=${NAME:-quality_refine}
refine=$([ "${REFINE:-1}" = 1 ] && echo --refine)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; date; mkdir -p "$name"
prompts=$(python3 -c "from sds3d.world.shapes import all_objects; print('\n'.join(o.prompt for o in all_objects()))")
for i in $(seq 0 $((shards - 1))); do
  mine=$(echo "$prompts" | awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' | paste -sd, -)
  timeout -k 10 "$seconds" python3 -m sds3d.cli bench quality --device cuda --preset "$preset" $refine --prompts "$mine" \
    --out "$name" --name "${name}_shard$i" > "$name/shard$i.log" 2>&1 &
done
wait; date
tail -n 2 "$name"/shard*.log | cut -c1-300
tar czf "$OUT/$name.tgz" "$name"
