#!/usr/bin/env bash
# The GPU check of issue #12, for a session that is lent a GPU machine (the `device` tool). PREPARED, NOT RUN:
# no session of issue #12 had a GPU yet, so this script has never been executed; expect to fix small things
# on its first run.
#
# What it does, in one call (about 5-8 minutes on an H200):
#   1. the QLoRA path on CUDA for real: NF4 base, paged_adamw_32bit, bf16, gradient checkpointing, sdpa
#      (FlashAttention when flash_attn imports), padding-free batches; 30 steps of tunewise train on the
#      bundled data; the plan's memory estimate against the measured peak (torch.cuda.max_memory_allocated);
#   2. the speed benchmark (benchmarks/bench_speed.py) against TRL on the same GPU;
#   3. one JSON with everything: $OUT/gpu.json (and the benchmark's own speed_gpu.json).
#
# The GPU machine reaches no network: the image has CUDA torch, transformers, peft and accelerate; the rest
# travels as wheels, and the model as its config and tokenizer (the weights of SmolLM2 are over the 64 MiB
# that may travel, so the GPU runs use the same architecture with random weights: speed and memory are those
# of SmolLM2, the loss values are not). Prepare here, once, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude; mkdir -p .whl .gpu/smollm2
#   for p in bitsandbytes==0.50.2 trl==1.16.0 datasets gguf dill multiprocess xxhash pyarrow; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl "$p"; done        # keep one version of each; check `unzip -p` METADATA for more needs
#   cp ~/.cache/tunewise/models/smollm2-135m-instruct/{config.json,generation_config.json,tokenizer*,special_tokens_map.json} .gpu/smollm2/
#
# Then: run(command="bash benchmarks/gpu.sh", carry=[".whl", ".gpu"], timeout_s=540), give_back().
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TUNEWISE_CACHE=/tmp/tunewise-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"

# A SmolLM2-135M-shaped model with random weights, saved where model.name can point.
python3 - <<'EOF'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(".gpu/smollm2")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained("/tmp/smollm2-random")
AutoTokenizer.from_pretrained(".gpu/smollm2").save_pretrained("/tmp/smollm2-random")
print("saved /tmp/smollm2-random", sum(p.numel() for p in model.parameters()))
EOF

# 1. QLoRA on CUDA, the whole tunewise path (plan, check, train, monitor, result.json).
python3 -m tunewise.cli train src/tunewise/configs/demo.yaml --force \
  model.name=/tmp/smollm2-random model.method=qlora name=gpu-qlora output_dir=/tmp/gpu-runs \
  training.optim=paged_adamw_32bit training.gradient_checkpointing=true training.max_steps=30 \
  training.per_device_train_batch_size=16 training.gradient_accumulation_steps=1 \
  training.eval_steps=30 training.save_steps=30 2>&1 | tail -40 | tee "$OUT/qlora.log" || true

# 2. The speed benchmark on the GPU (tunewise vs TRL, same model, LoRA, steps).
python3 benchmarks/bench_speed.py --model /tmp/smollm2-random --steps 12 \
  --out "$OUT/speed_gpu.json" 2>&1 | tail -30 | tee "$OUT/speed.log" || true

# 3. One JSON: the QLoRA run's plan, result (speed, memory estimate vs measured) and the benchmark.
python3 - <<'EOF'
import json, os, pathlib
import torch
out = pathlib.Path(os.environ["OUT"])
run = pathlib.Path("/tmp/gpu-runs/gpu-qlora")
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
try:
    import flash_attn  # noqa: F401
    flash = True
except Exception:
    flash = False
summary = {
    "gpu": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "flash_attn_installed": flash,
    "qlora_plan": read(run / "plan.json"),
    "qlora_result": read(run / "result.json"),
    "speed": read(out / "speed_gpu.json"),
}
(out / "gpu.json").write_text(json.dumps(summary, indent=2, default=str))
result = summary["qlora_result"] or {}
print("qlora:", result.get("status"), "memory:", result.get("memory"), "speed:", result.get("speed"))
print("speed ratios:", (summary["speed"] or {}).get("ratios"))
EOF
