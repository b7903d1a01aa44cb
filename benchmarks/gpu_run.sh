#!/usr/bin/env bash
# The GPU measurements of benchmarks/speed.py in one command, for a machine lent through the device tool (a few
# minutes on an H100/H200): after `bash benchmarks/gpu_bundle.sh` here, run(command="bash benchmarks/gpu_run.sh",
# carry=[".gpu"], timeout_s=540). Writes to $OUT (else gpu-out/): env.txt (GPU, versions), pre-steps.log (a few steps
# with train.head_init's probe and lora.init's EVA, which run before Trainer places the model), steady.txt (both
# pipelines, budgetlora's training in steady state, one epoch of 8,000 real rows end to end for both, measured),
# cold.txt (budgetlora's first run, every batch shape new), batch128.txt (budgetlora at batch 128: a GPU's memory; on a
# CPU the roberta-base shape takes 19 GB at that batch), and their logs. Copy the tables into the README's "On a GPU",
# with the GPU's name. Extra arguments go to every speed.py call; a quick local check of the script itself (budgetlora
# only, this machine's environment instead of the carried wheels):
#   PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh --pipelines budgetlora --steps 2 --warmup 1 --predict-rows 64 \
#     --e2e-rows 100 --e2e-texts 50
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" && -d .gpu/wheels ]]; then  # that machine installs nothing from the network: the carried wheels, over its own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site"
  # speed.py reads ../shared/data, which does not travel.
  [[ -e ../shared/data ]] || { mkdir -p ../shared && ln -s "$PWD/.gpu/data" ../shared/data; }
fi
python=${PYTHON:-python3}
"$python" - <<'PY' | tee "$out/env.txt"
import importlib.metadata as m

import torch

print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU visible)")
print("torch", torch.__version__, "CUDA", torch.version.cuda)
for name in ("transformers", "peft", "datasets", "accelerate", "pyarrow", "tokenizers"):
    print(name, m.version(name))
import budgetlora.train  # noqa: E402,F401  (fails here, early, if a library is missing or too old)
PY
speed() {  # one speed.py run: its table on stdout and in $out/$1.txt, its logs in $out/$1.log
  local name=$1; shift
  "$python" benchmarks/speed.py --models roberta-base "$@" 2> "$out/$name.log" | tee "$out/$name.txt"
}
# Work done before Trainer places the model (train.head_init's probe, lora.init's EVA) must run on this process's GPU:
# a few steps of the random roberta-base shape with both (its log in $out/pre-steps.log; about 4 minutes on a CPU).
pre_runs=$(mktemp -d)
if "$python" -m budgetlora.cli train --config configs/roberta-base-agnews.yaml model.random_init=true \
    model.name=../shared/data/roberta-base-tokenizer data.train=../shared/data/ag_news/train_subset.csv \
    data.max_train_rows=400 train.max_steps=3 train.head_init=linear_probe lora.init=eva runs_dir="$pre_runs" \
    name=pre-steps > "$out/pre-steps.log" 2>&1; then
  echo "pre-step check: ok, on $(grep -o '"device": "[^"]*"' "$pre_runs/pre-steps/manifest.json")"
else
  echo "pre-step check: FAILED (see pre-steps.log)"
fi
rm -rf "$pre_runs"
speed steady --steps 50 --reference-steps 20 --warmup 3 --e2e-rows 8422 --e2e-reference measure "$@"
speed cold --pipelines budgetlora --steps 50 --warmup 3 --cold --e2e-rows 2000 "$@"
speed batch128 --pipelines budgetlora --steps 30 --warmup 3 --e2e-rows 2000 \
  --set train.batch_size=128 train.eval_batch_size=256 "$@"
