#!/usr/bin/env bash
# One device lease of the batch benchmark (benchmarks/batch_gpu.md): install the carried wheels, check
# `sds3d batch` on the GPU with and without the compiled prior, then time K = 64, 16, 4, 1 against
# sequential `sds3d generate` processes. The report comes back in $OUT/.
#   [PRESET=fast-sd ARCH=sd15 STEPS=N NAME=batch_gpu_sd15 PROMPTS_MIN=N SMOKE=0] bash scripts/device_batch.sh [SEQUENTIAL] [SCENES]
# PRESET/ARCH: another preset, with random weights of that architecture as its prior (SD 1.5 scale).
# PROMPTS_MIN: results per K at least (default 16); SMOKE=0 skips the compiled-prior check (the batch
# then runs the prior uncompiled, as a preset with a diffusers prior does in a batch anyway).
set -uo pipefail
seq=${1:-3} scenes=${2:-64,16,4,1}
extra=(--preset "${PRESET:-default}" --steps "${STEPS:-800}" --prompts-min "${PROMPTS_MIN:-16}")
[ -n "${ARCH:-}" ] && extra+=(--arch "$ARCH")
[ -n "${NAME:-}" ] && extra+=(--name "$NAME")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
printf 'a red cube\na blue torus\n' > /tmp/p2.txt
compile=no
if [ "${SMOKE:-1}" = 1 ] && timeout 240 python3 -m sds3d.cli batch /tmp/p2.txt --device cuda --steps 30 --scenes 2 --out /tmp/s1 --compile yes \
     --no-progress > /tmp/s1.log 2>&1; then compile=yes; else tail -5 /tmp/s1.log; fi
echo "compiled smoke: $compile"; date
python3 -m sds3d.bench.batch --device cuda --scenes "$scenes" --sequential "$seq" --compile "$compile" \
  "${extra[@]}" --out "$OUT" 2>&1 | grep -v Warning | tail -30
date
