#!/usr/bin/env bash
# One command for a borrowed GPU: the GPU test tier, then train_dpo.py timed at the
# minimind and minimind-768 shapes in bfloat16 (tokens/s, pairs/s, MFU, peak memory) next
# to the MiniMind-style naive trainer on the same device.
#     bash scripts/gpu_check.sh            (prints a summary to paste into the README)
#     OUT=folder bash scripts/gpu_check.sh (also keeps the whole log and each row's log)
# Python is $PYTHON, else python3, else python. Installs nothing when torch, numpy,
# tiktoken, tqdm and pytest import (a borrowed box may have no network and its own torch).
# A failing test does not stop it: the timing table is always printed, and the exit
# status is the tests' at the end. Bounded: the tests by `timeout 180`, the timing by
# `timeout 170` over 6 rows x 28 s (gpu_check.py's --row-limit; each row is stopped once
# 6 s are timed, about 20 s with start-up): 350 s at most, under 6 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if ! "$PY" -c "import torch, numpy, tiktoken, tqdm, pytest" 2>/dev/null; then
    echo "gpu_check: installing requirements.txt and pytest with $PY"
    "$PY" -m pip install --quiet -r requirements.txt pytest || echo "gpu_check: install failed"
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
    torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0)
    if torch.cuda.is_available() else 'none')" || exit 1
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA GPU here; nothing to test or time"
    exit 0
fi
timeout 180 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider
tests=$?
timeout 170 "$PY" -m tools.gpu_check --work-dir "$OUT" "$@"
timing=$?
echo "gpu_check: GPU tests exit $tests (0 = all passed; 124 = cut at 180 s), timing exit $timing"
[ "$tests" -eq 0 ] && [ "$timing" -eq 0 ]
