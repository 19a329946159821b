#!/usr/bin/env bash
# The checks that need one NVIDIA GPU, for a lent device session. The parts named run in this order:
#   throughput  benchmarks/train_throughput.py --device cuda: the seed's step against uncond's, bf16, batch 16
#               and 64 (issue 5's 2x goal and MFU); about 8 minutes on the H200 (8 processes);
#   fsdp        FSDP2 on CUDA/NCCL with bf16 (accelerate's mixed-precision policy), one process: 20 steps with
#               a checkpoint at 10, then a resume to 30; the pipeline must load; about 1.5 minutes;
#   graphs      --cuda_graphs (src/uncond/step_graph.py, never run on a GPU before): the bare step recorded
#               against the eager one (benchmarks/bare_step.py); the tiny preset trained 20 steps with and
#               without it, in fp32 (and eager twice, for the noise between processes) and bf16, weights, losses
#               and gradient norms compared (an epoch's last, shorter batch takes the eager step); then the
#               throughput at batch 64 against the seed's step, one pair; about 6 minutes;
#   diagnose    where uncond's eager step at batch 64 spends its time: the bare step (benchmarks/bare_step.py)
#               at batch 64 and 1 beside uncond's step, with and without its loader, its host synchronisations
#               and a profile; ~3 minutes;
#   parity      benchmarks/compile_parity.py --device cuda: whether the compiled UNet's gradients are right (torch
#               2.13's CPU code computes them wrongly); about a minute;
#   compile     the throughput at batch 64 with uncond's --compile, once, in what is left of 9 minutes
#               (compiling takes minutes: it goes last, so the figures before it come back either way).
# Usage, from the repository root (diffusers, datasets and their needs as wheels in .whl/ if the machine
# lacks them: `bash benchmarks/gpu_wheels.sh` here downloads them; carry .whl):
#   bash benchmarks/gpu_checks.sh OUT_DIR [PART,PART...]   (default: graphs,parity,diagnose,compile, what is
# left to measure, most wanted first; at most 9 minutes in all, under the device's 10 per command)
set -uo pipefail
out=${1:?give a folder for the results}
parts=",${2:-graphs,parity,diagnose,compile},"
work=/tmp/uncond-gpu-checks  # training folders stay out of OUT_DIR, which gets the logs
mkdir -p "$out" "$work"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git log -1 --format='commit %H' 2>/dev/null | tee -a "$out/gpu.txt"

if [[ $parts == *,throughput,* ]]; then
  echo "== training throughput"
  timeout 500 python3 benchmarks/train_throughput.py --device cuda --repeats 2 2>&1 | tee "$out/train_throughput.txt"
fi

left() {  # seconds a part may take: at most $1, and what is left of the script's 540
  local rest=$((540 - SECONDS))
  echo $(( rest < $1 ? (rest > 1 ? rest : 1) : $1 ))
}

write_images() {  # 64 random 40x40 images in $work/images
python3 - "$work/images" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(64):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
EOF
}

if [[ $parts == *,graphs,* ]]; then
  echo "== --cuda_graphs: the bare step recorded, the same runs with and without it, the throughput at batch 64"
  timeout "$(left 100)" python3 benchmarks/bare_step.py --device cuda --variants eager,cuda-graph 2>&1 \
    | tee "$out/bare_step_graphs.txt"
  write_images
  rm -rf "$work"/graphs-*  # a rerun on a warm machine must train again, not find these runs complete
  graphs_run() {  # PRECISION NAME [FLAGS]: 20 steps of 12 images (64 images: each epoch ends with 4)
    timeout "$(left 100)" python3 -m uncond train --train_data_dir "$work/images" --model_preset tiny --resolution 32 \
      --train_batch_size 12 --max_train_steps 20 --logging_steps 1 --lr_scheduler constant --use_ema \
      --save_images_epochs 1000 --logger none --seed 0 --mixed_precision "$1" --output_dir "$work/graphs-$2" \
      "${@:3}" > "$out/graphs_$2.log" 2>&1; echo "$2: exit $?"
  }
  graphs_run no no-eager
  graphs_run no no-eager-again  # how far two eager processes differ (cuDNN chooses its algorithms in each)
  graphs_run no no-graphs --cuda_graphs
  graphs_run bf16 bf16-eager
  graphs_run bf16 bf16-graphs --cuda_graphs
  grep -h "speed:\|recorded the step\|cuda_graphs:\|uncond: error\|Error" "$out"/graphs_*.log | cut -c1-300
  python3 - "$work" <<'EOF' 2>&1 | tee "$out/graphs_parity.txt"
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

work = Path(sys.argv[1])


def compare(first: str, second: str) -> None:
    try:
        runs = [work / f"graphs-{name}" for name in (first, second)]
        weights = [load_file(run / "unet" / "diffusion_pytorch_model.safetensors") for run in runs]
        records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    except Exception as error:  # a run that failed: its log says why
        print(f"{first} against {second}: no comparison ({error})")
        return
    weight_diff = max((weights[0][name].float() - weights[1][name].float()).abs().max().item() for name in weights[0])
    print(f"{first} against {second}: weights after 20 steps differ by at most {weight_diff:.3g}")
    for key in ("loss", "grad_norm"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(*records) if key in a and key in b]
        print(f"  {key} differences by step: {' '.join(f'{d:.1e}' for d in diffs)}")
    speeds = [[r["images_per_sec"] for r in run_records[5:] if r.get("images_per_sec")] for run_records in records]
    print("  images/s from step 6 on (median): " + ", ".join(
        f"{sorted(s)[len(s) // 2]:.0f}" if s else "-" for s in speeds))


compare("no-eager", "no-eager-again")
compare("no-eager", "no-graphs")
compare("bf16-eager", "bf16-graphs")
EOF
  echo "== --cuda_graphs throughput, batch 64 ($((540 - SECONDS)) s left)"
  timeout "$(left 240)" python3 benchmarks/train_throughput.py --device cuda --repeats 1 --cuda_graphs \
    --configs seed64-b64 2>&1 | tee "$out/train_throughput_graphs.txt"
fi

if [[ $parts == *,fsdp,* ]]; then
echo "== FSDP2 on one GPU, bf16, checkpoint and resume"
write_images
fsdp() {
  timeout 90 accelerate launch --config_file "$(python3 -m uncond launch-config fsdp)" --num_processes 1 -m uncond train \
    --train_data_dir "$work/images" --model_preset tiny --resolution 32 --train_batch_size 16 --use_ema \
    --mixed_precision bf16 --checkpointing_steps 10 --logger none --seed 0 --output_dir "$work/fsdp" "$@"
}
rm -rf "$work/fsdp"  # a rerun on a warm machine must train again
fsdp --max_train_steps 20 > "$out/fsdp_train.log" 2>&1; echo "train: exit $?"
fsdp --max_train_steps 30 > "$out/fsdp_resume.log" 2>&1; echo "resume: exit $?"
grep -h "weights sharded\|resuming from\|uncond: error\|Error" "$out"/fsdp_*.log | cut -c1-300
ls "$work/fsdp/checkpoint-30" 2>&1
python3 -c "
import sys
from diffusers import DiffusionPipeline
pipeline = DiffusionPipeline.from_pretrained(sys.argv[1]).to('cuda')
print('pipeline loads and samples:', pipeline(batch_size=2, num_inference_steps=5, output_type='np').images.shape)
" "$work/fsdp" 2>&1 | tail -1
fi

if [[ $parts == *,parity,* ]]; then
  echo "== compiled gradients against eager float64"
  timeout "$(left 150)" python3 benchmarks/compile_parity.py --device cuda 2>&1 | tee "$out/compile_parity.txt"
fi

if [[ $parts == *,diagnose,* ]]; then
  echo "== where the eager step's time goes, batch 64"
  timeout "$(left 120)" python3 benchmarks/bare_step.py --device cuda --variants eager 2>&1 | tee "$out/bare_step.txt"
  timeout "$(left 200)" python3 benchmarks/train_throughput.py --device cuda --repeats 1 --configs seed64-b64 --diagnose \
    2>&1 | tee "$out/diagnose.txt"
fi

if [[ $parts == *,compile,* ]]; then
  echo "== training throughput with --compile, batch 64 ($((540 - SECONDS)) s left)"
  timeout "$(left 540)" python3 benchmarks/train_throughput.py --device cuda --repeats 1 --compile \
    --configs seed64-b64 2>&1 | tee "$out/train_throughput_compile.txt"
fi
