# The two commands a fresh machine needs: `make demo` and `make test`. Both create .venv first
# (scripts/setup_venv.sh: the CPU build of torch where there is no GPU; a torch you already have is kept).
PY := .venv/bin/python
STAMP := .venv/.sds3d-installed
PROMPT ?= a blue torus

.PHONY: setup demo app test lint bench bench-gpu gallery clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sds3d.cli generate "$(PROMPT)"

# The browser interface at http://127.0.0.1:7860 (Ctrl-C stops it).
app: $(STAMP)
	$(PY) -m sds3d.cli app

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q --durations=8

# CPU benchmarks (this machine): about 3.5 hours in all on 2 cores.
bench: $(STAMP)
	$(PY) -m sds3d.bench.cpu_step --out benchmarks
	$(PY) -m sds3d.cli bench quality --model sds3d/world-prior-32-fronts --camera-guidance 5 --out benchmarks \
		--name quality_fronts --image docs/gallery_fronts.png
	$(PY) -m sds3d.cli bench quality --steps 400 --out benchmarks --name quality_400_steps
	$(PY) -m sds3d.cli bench quality --quick --steps 400 --variants no-camera,no-view-prompts \
		--name quality_ablation --out benchmarks
	$(PY) -m sds3d.bench.prior_accuracy --out benchmarks
	$(PY) -m sds3d.bench.prior_accuracy --out benchmarks --camera --name prior_accuracy_camera
	$(PY) -m sds3d.bench.gallery --out benchmarks

# GPU benchmarks (an NVIDIA GPU; random-weight SD architectures, nothing downloaded).
bench-gpu: $(STAMP)
	$(PY) -m sds3d.cli bench speed --arch sd15,sd21,builtin --steps 30 --warmup 10 --out benchmarks --name speed_eager
	$(PY) -m sds3d.cli bench speed --arch sd15 --compile --steps 30 --warmup 15 --out benchmarks --name speed_compile
	$(PY) -m sds3d.cli bench speed --arch sd15 --compile --compile-mode reduce-overhead --steps 30 --warmup 15 \
		--out benchmarks --name speed_compile_unet_graphs
	$(PY) -m sds3d.cli bench speed --arch sd15 --compile --compile-mode reduce-overhead --nerf-compile \
		--steps 30 --warmup 15 --out benchmarks --name speed_compile_graphs_fd
	$(PY) -m sds3d.cli bench speed --arch sd15,sd21 --compile --compile-mode reduce-overhead --nerf-compile \
		--normals closed_form --steps 30 --warmup 15 --out benchmarks --name speed_compile_graphs_closed
	$(PY) -m sds3d.cli bench speed --arch builtin --compile --compile-mode reduce-overhead --nerf-compile \
		--steps 30 --warmup 15 --out benchmarks --name speed_builtin_graphs
	for k in torch triton; do $(PY) -m sds3d.cli bench speed --arch sd15 --compile --compile-mode reduce-overhead \
		--nerf-compile --normals closed_form --hash-grid $$k --steps 30 --warmup 15 --out benchmarks \
		--name speed_hash_grid_$$k; done
	for f in channels-last no-channels-last; do $(PY) -m sds3d.cli bench speed --arch sd15,sd21 --compile \
		--compile-mode reduce-overhead --nerf-compile --normals closed_form --$$f --steps 30 --warmup 15 \
		--out benchmarks --name speed_fast_sd$$( [ $$f = no-channels-last ] && echo _channels_first ); done
	$(PY) -m sds3d.cli bench speed --arch sd15,sd21 --compile --compile-mode reduce-overhead --nerf-compile \
		--normals closed_form --steps 30 --warmup 15 --rgb-as-latents --out benchmarks --name speed_fast_sd_latent_warmup
	$(PY) -m sds3d.cli bench speed --arch sd15 --compile --compile-mode reduce-overhead --nerf-compile \
		--normals closed_form --steps 30 --warmup 15 --out benchmarks --name speed_fast_sd_same_lease
	for l in "" --rgb-as-latents; do $(PY) -m sds3d.cli bench speed --arch sdxl --compile --compile-mode reduce-overhead \
		--nerf-compile --normals closed_form --steps 30 --warmup 15 $$l --out benchmarks \
		--name speed_fast_sdxl$$( [ -n "$$l" ] && echo _latent_warmup ); done
	$(PY) scripts/prior_sampler_sweep.py --device cuda --out benchmarks
	$(PY) -m sds3d.cli bench quality --quick --steps 400 --device cuda --out benchmarks --name quality_quick_h100
	$(PY) -m sds3d.cli bench quality --quick --steps 800 --device cuda --out benchmarks --name quality_quick_800_h100

gallery: $(STAMP)
	$(PY) -m sds3d.cli bench quality --quick --name quality_quick --image docs/gallery_fronts.png --out runs/gallery

clean:
	rm -rf .venv outputs .pytest_cache .ruff_cache .mypy_cache
