#!/usr/bin/env bash
# One device lease of `sds3d study` (see benchmarks/README.md): install the carried wheels, check one
# cell on the GPU, then run the given specs with N workers for at most SECONDS, while (optionally)
# training the prior snapshots of studies/prior.toml beside them and measuring their accuracy.
# Cells (and prior accuracy reports) come back in $OUT/results.tgz, snapshots as pipeline-step*.tgz.
#   bash scripts/device_study.sh WORKERS SECONDS [--snapshots] SPEC...
set -uo pipefail
workers=$1 seconds=$2; shift 2
snap=0; if [ "${1:-}" = "--snapshots" ]; then snap=1; shift; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
mkdir -p runs
if [ -f carried/results.tgz ]; then tar xzf carried/results.tgz runs; fi
if [ -d carried/prior-snap ]; then cp -r carried/prior-snap runs/; fi
if [ "${SMOKE:-1}" = 1 ]; then
printf 'name="smoke"\nseeds=1\nprompts=["a red cube"]\n[base]\nsteps=50\n' > /tmp/smoke.toml
python3 -m sds3d.cli study /tmp/smoke.toml --device cuda --dir /tmp/smoke --no-plots --out /tmp/smoke-out > /tmp/smoke.log 2>&1 \
  || { tail -20 /tmp/smoke.log; exit 1; }
python3 -c "import json; c = json.load(open('/tmp/smoke-out/study_smoke.json'))['cells'][0]; print('smoke cell (50 steps):', c['seconds'], 's,', c['train_seconds'], 's training')"
fi; date
if [ $snap = 1 ]; then
  mkdir -p pa
  (python3 -m sds3d.cli prior train --out runs/prior-snap --device cuda --steps 1000 --compile --no-progress \
     --snapshots 500,1000 > pa/prior.log 2>&1
   rm -rf runs/prior-snap/pipeline
   for n in 500 1000; do
     python3 -m sds3d.bench.prior_accuracy --camera --device cuda --model runs/prior-snap/pipeline-step$n \
       --out pa --name prior_accuracy_step$n >> pa/prior.log 2>&1
   done; echo prior-done >> pa/prior.log) &
fi
timeout -k 15 -s INT "${HARD:-$((seconds + 240))}" python3 -m sds3d.cli study "$@" --device cuda --workers "$workers" \
  --scenes "${SCENES:-1}" --time-limit "$seconds" --no-plots \
  --out /tmp/rep > /tmp/study.log 2>&1
date; tr '\r' '\n' < /tmp/study.log | grep -v '^ *$' > "$OUT/study.log"; tail -n 3 "$OUT/study.log"
echo "cells: $(ls runs/study-cells/cells | wc -l)"
if [ $snap = 1 ]; then
  for i in $(seq 30); do grep -q prior-done pa/prior.log && break; sleep 2; done
  tail -n 3 pa/prior.log; grep -h "^| " pa/*.md
  cp runs/prior-snap/train_log.json pa/ 2>/dev/null
  (cd runs && for d in prior-snap/pipeline*; do tar czf "$OUT/$(basename "$d").tgz" "$d"; done)
fi
tar czf "$OUT/results.tgz" runs/study-cells/cells $( [ -d pa ] && echo pa )
ls -la "$OUT"
