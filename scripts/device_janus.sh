#!/usr/bin/env bash
# One device lease of `sds3d bench janus`: each condition in its own process at once on one GPU, their
# reports joined into one and packed with the turntable strips in $OUT/janus.tgz (the device returns
# few files); unpack it here and copy janus/janus.{md,json,png} into benchmarks/.
#   bash scripts/device_janus.sh SECONDS [SEEDS] [FRONT_SHARE]
set -uo pipefail
seconds=$1 seeds=${2:-3} share=${3:-0.75}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi -L; date; mkdir -p janus
conditions=$(python3 -c "from sds3d.bench.janus import CONDITIONS; print(' '.join(CONDITIONS))")
for c in $conditions; do
  timeout -k 10 "$seconds" python3 -m sds3d.cli bench janus --device cuda --seeds "$seeds" --front-share "$share" \
    --conditions "$c" --out janus --name "janus_$c" --image "janus/janus_$c.png" > "janus/$c.log" 2>&1 &
done
wait; date
tail -n 3 janus/*.log | cut -c1-300
python3 -m sds3d.cli bench janus --combine janus/janus_*.json --out janus --name janus --image janus/janus.png | head -12
tar czf "$OUT/janus.tgz" janus
