#!/usr/bin/env bash
# One command for a borrowed GPU: the GPU test tier, then train_dpo.py timed at the
# minimind and minimind-768 shapes in bfloat16 (tokens/s, pairs/s, MFU, peak memory) next
# to the MiniMind-style naive trainer on the same device. A few minutes on one H100/H200.
#     bash scripts/gpu_check.sh            (prints a summary to paste into the README)
# Installs nothing when torch, numpy, tiktoken, tqdm and pytest are there (a borrowed box
# may have no network and its own torch); else what requirements.txt names.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, numpy, tiktoken, tqdm, pytest" 2>/dev/null \
    || python -m pip install --quiet -r requirements.txt pytest
python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
    torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0)
    if torch.cuda.is_available() else 'none')"
python -m pytest tests/gpu -v -rs -p no:cacheprovider
python -m tools.gpu_check "$@"
