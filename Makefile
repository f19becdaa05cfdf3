# lake: the two commands a new user types are `make demo` and `make test`.
# Both install what they need first (scripts/setup is idempotent).

PY      := .venv/bin/python
KVER     = $(shell scripts/kver)

.PHONY: all setup module demo test test-host test-vm test-gpu bench-vm bench-gpu clean

all: module

setup:
	@bash scripts/setup

module: setup
	@$(MAKE) -s -C kmod KVER=$(KVER)
	@$(MAKE) -s -C lakelib/examples KVER=$(KVER)

demo: module
	@bash scripts/vm -- bash scripts/demo

test: setup test-host test-vm

test-host: setup
	$(PY) -m pytest -q tests/host

test-vm: module
	bash scripts/vm -- bash tests/vm/run

# On a machine with an NVIDIA GPU (the device machine).
test-gpu:
	python3 -m pytest -q tests/gpu

bench-vm: module
	bash scripts/vm -- bash -c '.venv/bin/python scripts/bench/vm_roundtrip.py && \
		.venv/bin/python scripts/bench/vm_features.py'

# On the device machine (GPU; no module loading there).
bench-gpu:
	python3 scripts/bench/dataplane_gpu.py
	for lc in gemm conv attn kinfer; do \
		python3 scripts/bench/sched_gpu.py --lc $$lc --stall-s 600 \
			--out /tmp/lake-sched-$$lc.json || exit 1; done
	python3 scripts/bench/sched_gpu.py --merge /tmp/lake-sched-gemm.json \
		/tmp/lake-sched-conv.json /tmp/lake-sched-attn.json /tmp/lake-sched-kinfer.json \
		--out docs/bench/sched_gpu.json --plot docs/bench/sched_gpu.png

clean:
	@$(MAKE) -s -C kmod clean KVER=$(KVER) || true
	@$(MAKE) -s -C lakelib/examples clean KVER=$(KVER) || true
