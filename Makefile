# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENTOML := $(VENV)/bin/bentoml
PORT ?= 3000
TINY_MODEL := .cache/tiny-blenderbot

.PHONY: help install test serve tiny-model serve-tiny bento

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with every dependency (fast when done)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: install  ## run the whole offline test suite
	$(PY) -m pytest

serve: install  ## run the service on 127.0.0.1:$PORT (CHATBOT_MODEL = hub id or local dir)
	tag=$$($(PY) import_model.py) && \
	CHATBOT_MODEL_TAG=$$tag exec $(BENTOML) serve service:Chatbot --host 127.0.0.1 --port $(PORT)

$(TINY_MODEL)/model.safetensors: | $(VENV)/.installed
	$(PY) -m chatbot.tiny_model $(TINY_MODEL)

tiny-model: install $(TINY_MODEL)/model.safetensors  ## build the tiny offline test model

serve-tiny: tiny-model  ## run the service on the tiny offline model
	$(MAKE) serve CHATBOT_MODEL=$(abspath $(TINY_MODEL))
