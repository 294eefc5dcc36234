#!/usr/bin/env bash
# The GPU figures in the README, from one GPU:
#
#   bash benchmarks/gpu_check.sh ENCODER POKEMON_FOLDER OUT_DIR
#   STAGES="bench shapes" bash benchmarks/gpu_check.sh ...     # only some stages
#
# ENCODER: --text_encoder for the runs (minilm, or a local folder such as MiniLM saved in fp16);
# POKEMON_FOLDER: a local imagefolder of Pokémon (images + metadata.jsonl). Stages (STAGES picks
# them), each with a time limit, their output appended to OUT_DIR/log.txt:
#   bench    bench_unet.py, eager: our U-Net against diffusers at 32 and 64 px, batch 256
#   shapes   a 1000-step shapes run (default 32 px model, batch 256), then bench_sampling.py and
#            adherence.py on its checkpoint; its EMA weights come back in fp16
#   pokemon  a Pokémon run with the GPU recipe's model, stopped by SIGTERM at its limit (which saves)
#   recipe   bench_unet.py on the GPU recipe's layout (64 px, batch 256), eager
#   compile  bench_unet.py with torch.compile at 64 px, batch 256 (compilation takes minutes)
# A stage that fails or runs out of time does not stop the next one. On an H200 the limits add up
# to about 20 minutes (the first run, with shorter limits, was cut in most stages): under a
# 10-minute command limit run "bench shapes", then "pokemon recipe compile".
set -u
ENCODER=$1 POKEMON=$2 OUT=$3
QUICK=${QUICK:-0}  # QUICK=1: a few steps of everything, to check the script itself on a CPU
STAGES=" ${STAGES:-bench shapes pokemon recipe compile} "
want() { [[ $STAGES == *" $1 "* ]]; }
mkdir -p "$OUT/runs"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout -s TERM -k 20 "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0))s" | tee -a "$LOG"
}
latest_run() { ls -dt "$OUT"/runs/*-"$1" 2>/dev/null | head -n 1; }

if [ "$QUICK" = 1 ]; then
  BENCH="--repeats=1 --steps=1 --batch_size=2 --device=cpu" SHAPES="--max_steps=20 --batch_size=16 --shapes_num_images=512 --image_size=16 --base_channels=32 --channel_mults=1,2 --attention_levels=1 --eval_interval=10 --sample_interval=20 --ckpt_interval=10 --steps=3 --device=cpu"
  SAMPLING="--repeats=1 --samplers=ddim10,ddim5 --device=cpu" POKE="--max_steps=4 --batch_size=4 --base_channels=32 --image_size=32 --sample_interval=2 --eval_interval=2 --steps=2 --device=cpu"
  COMPILE_SIZE=32
else
  BENCH="--repeats=5 --batch_size=256" SHAPES="--max_steps=1000 --batch_size=256 --lr=5e-4 --min_lr=5e-5 --warmup_steps=100 --eval_interval=500 --sample_interval=1000 --ckpt_interval=500"
  SAMPLING="--repeats=2" POKE="--max_steps=1500 --batch_size=64 --eval_interval=500 --sample_interval=500 --ckpt_interval=500"
  COMPILE_SIZE=64
fi
RECIPE="--base_channels=128 --channel_mults=1,2,2,4 --attention_levels=1,2,3"

stage environment 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; python3 -c "import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"cuda\", torch.cuda.is_available())"; python3 -c "import diffusers, datasets, pyarrow; print(\"diffusers\", diffusers.__version__, \"datasets\", datasets.__version__, \"pyarrow\", pyarrow.__version__)"; nproc'
if want bench; then
  stage bench_eager 150 python3 -m benchmarks.bench_unet --image_sizes=32,64 $BENCH
fi
if want shapes; then
  # the 11.3 M layout of the earlier GPU figures (the defaults are now the 120 M GPU recipe)
  stage shapes_train 200 python3 train_diffusion.py --dataset=shapes --text_encoder="$ENCODER" --wandb_mode=disabled --out_dir="$OUT/runs" \
    --base_channels=64 --channel_mults=1,2,2 --attention_levels=1,2 --dropout=0 $SHAPES
  SHAPES_RUN=$(latest_run shapes)
  stage bench_sampling 150 python3 -m benchmarks.bench_sampling --checkpoint="$SHAPES_RUN" $SAMPLING
  stage adherence 60 python3 -m benchmarks.adherence --checkpoint="$SHAPES_RUN" --repeats=4 --plot="$OUT/adherence.png" $([ "$QUICK" = 1 ] && echo --steps=5 --device=cpu)
  cp "$(ls "$SHAPES_RUN"/samples_*.png | tail -n 1)" "$OUT/shapes_samples.png"
  # the run's EMA weights in fp16, in two files under 16 MB, for sampling experiments elsewhere
  python3 - "$SHAPES_RUN" "$OUT" <<'EOF' >>"$LOG" 2>&1
import sys, torch
ckpt = torch.load(f"{sys.argv[1]}/ckpt.pt", weights_only=True, map_location="cpu")
ema = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
sizes = torch.tensor([v.numel() * v.element_size() for v in ema.values()]).cumsum(0)
half = int((sizes <= sizes[-1] // 2).sum())  # split by bytes: each file under 16 MB
keys = list(ema)
for part, names in (("a", keys[:half]), ("b", keys[half:])):
    torch.save({"ema": {k: ema[k] for k in names}, "model_args": ckpt["model_args"], "step": ckpt["step"],
                "text_encoder": ckpt["text_encoder"], "num_timesteps": ckpt["num_timesteps"],
                "prediction_type": ckpt.get("prediction_type", "eps")}, f"{sys.argv[2]}/ema_{part}.pt")
print("saved EMA of step", ckpt["step"])
EOF
fi
if want pokemon; then
  stage pokemon_train 150 python3 train_diffusion.py --dataset="$POKEMON" --text_encoder="$ENCODER" --wandb_mode=disabled --dropout=0.1 --out_dir="$OUT/runs" $RECIPE $POKE
  POKEMON_RUN=$(latest_run "$(basename "$POKEMON")")
  cp "$(ls "$POKEMON_RUN"/samples_*.png | tail -n 1)" "$OUT/pokemon_samples.png"
fi
rm -rf "$OUT/runs"  # checkpoints are too large to bring back (the Pokémon one is 1.9 GB); the log holds the numbers
if want recipe; then
  stage bench_recipe 120 python3 -m benchmarks.bench_unet --image_sizes=64 $RECIPE $BENCH
fi
if want compile; then
  stage bench_compile 300 python3 -m benchmarks.bench_unet --image_sizes=$COMPILE_SIZE --compile=true $BENCH
fi
grep -E "^=== .*exit|^\| |img/s|finished at|stopped by|adherence seen|DDIM-25 .*vs" "$LOG" | tail -n 80
