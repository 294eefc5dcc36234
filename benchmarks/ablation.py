"""
The adherence ablation of the README: each lever alone and the chosen combination, trained with
the CPU recipe (config/shapes_cpu.py) for the same number of steps, then judged with every sampler.

    python -m benchmarks.ablation --out_dir=ablation --jobs=2               # train what is missing, judge, print the table
    python -m benchmarks.ablation --out_dir=ablation --variants=baseline,v --train_seeds=0,1

Each (variant, training seed) trains in its own process (`--jobs` at a time, the cores split
between them, OMP_NUM_THREADS = cores / jobs) into <out_dir>/<variant>-s<seed>, unless a finished
checkpoint is already there, and is then judged on shapes.eval_prompts() with CFG (w = --guidance)
by DDPM-1000 (only for the variants in --ddpm_variants: 1000 steps of a doubled batch cost 10 CPU
minutes a run), DDIM-25 and DDIM-10 with eta = 0, over --repeats sampling seeds; DDIM-25 eta = 0 also
at w = 0 (chance) and on the novel wordings (templates no training caption uses). Results go to
<run>/ablation.json; the table is printed from those files, so a second call only reprints it.
Training speed is not measured here (runs share the cores): measure each variant's img/s alone
with `--speed=true`, which trains every variant for 200 steps, one at a time, on all cores.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


import torch

from benchmarks.adherence import ATTRS, load_shapes_checkpoint, score
from configurator import UserError, parse_config, run_cli
from text_encoders import TextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CPU recipe (config/shapes_cpu.py) as it was before this ablation: eps, no positions, the six
# caption templates. Each variant changes one thing; "chosen" is the recipe file as it is now.
BEFORE = ["--prediction_type=eps", "--pos_embed=false", "--coord_conv=false", "--min_snr_gamma=0", "--shapes_captions=six"]
VARIANTS = {
    "baseline": BEFORE,
    "v": BEFORE + ["--prediction_type=v"],
    "pos_embed": BEFORE + ["--pos_embed=true"],
    "coord_conv": BEFORE + ["--coord_conv=true"],
    "min_snr": BEFORE + ["--min_snr_gamma=5"],
    "attn16": BEFORE + ["--attention_levels=0,1"],
    "varied_captions": BEFORE + ["--shapes_captions=varied"],
    "chosen": [],
}
RECIPE = ["config/shapes_cpu.py", "--wandb_mode=disabled"]
DEFAULTS = dict(out_dir="ablation", variants=",".join(VARIANTS), train_seeds="0", ddpm_variants="baseline,chosen", jobs=2,
                max_steps=3000, repeats=4, guidance=3.0, speed=False)


def run_one(C, name, seed, threads):
    run_dir = os.path.join(C.out_dir, f"{name}-s{seed}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    done = os.path.isfile(ckpt_path) and torch.load(ckpt_path, map_location="cpu", weights_only=True)["step"] >= C.max_steps
    if not done:
        os.makedirs(run_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "train_diffusion.py"), *RECIPE, *VARIANTS[name], f"--seed={seed}",
               f"--max_steps={C.max_steps}", f"--out_dir={run_dir}", "--resume=auto"]
        with open(os.path.join(run_dir, "train.out"), "w") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
        # train_diffusion makes a timestamped run folder inside out_dir: take its checkpoint up one level
        inner = [d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "ckpt.pt"))]
        if inner:  # a run resumed from <run_dir>/ckpt.pt trained in place
            os.replace(os.path.join(run_dir, sorted(inner)[-1], "ckpt.pt"), ckpt_path)
    result_path = os.path.join(run_dir, "ablation.json")
    if os.path.isfile(result_path):
        return
    cmd = [sys.executable, "-m", "benchmarks.ablation", f"--out_dir={C.out_dir}", f"--repeats={C.repeats}",
           f"--guidance={C.guidance}", f"--ddpm_variants={C.ddpm_variants}", f"--variants={name}", f"--train_seeds={seed}",
           "--jobs=0"]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def judge_run(C, name, seed):
    """Score one trained run with every sampler; write <run>/ablation.json."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    run_dir = os.path.join(C.out_dir, f"{name}-s{seed}")
    _, ckpt, model, scheduler = load_shapes_checkpoint(run_dir, True)
    encoder = TextEncoder(ckpt["text_encoder"])
    w, out = C.guidance, {}
    setups = [("ddim25_eta0", "ddim", 25, 0.0), ("ddim10_eta0", "ddim", 10, 0.0)]
    if name in C.ddpm_variants.split(","):
        setups.insert(0, ("ddpm1000", "ddpm", ckpt["num_timesteps"], 1.0))
    for key, sampler, steps, eta in setups:
        scales = [0.0, w] if key == "ddim25_eta0" else [w]
        res, spi = score(model, scheduler, encoder, scales, sampler, steps, 0, C.repeats, eta)
        out[key] = res[w]
        if key == "ddim25_eta0":
            out["ddim25_eta0_w0"] = res[0.0]
        print(f"{name}-s{seed} {key}: " + " ".join(f"{s}:{a} {res[w][s][a]:.2f}" for s in res[w] for a in ATTRS), flush=True)
    res, _ = score(model, scheduler, encoder, [w], "ddim", 25, 0, C.repeats, 0.0, wording="novel")
    out["novel_ddim25_eta0"] = res[w]
    with open(os.path.join(run_dir, "ablation.json"), "w") as f:
        json.dump(out, f, indent=1)


def speed(C, names):
    """img/s of each variant alone on all cores: 200 steps, the rate logged over the last 100, and
    the run's wall time (start-up, data and caption embeddings included)."""
    import time

    for name in names:
        run_dir = os.path.join(C.out_dir, "speed", name)
        cmd = [sys.executable, os.path.join(ROOT, "train_diffusion.py"), *RECIPE, *VARIANTS[name], "--max_steps=200",
               "--eval_interval=100000", "--sample_interval=100000", f"--out_dir={run_dir}"]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                       cwd=ROOT)
        wall = time.time() - t0
        inner = sorted(os.listdir(run_dir))[-1]
        rates = [r["train/images_per_s"] for r in map(json.loads, open(os.path.join(run_dir, inner, "log.jsonl")))
                 if "train/images_per_s" in r and r["step"] > 100]
        print(f"{name}: {sum(rates) / len(rates):.1f} img/s, {wall:.0f} s for the 200-step run", flush=True)


def table(C, names, seeds):
    """The README's two tables: adherence with CFG by sampler, then w = 0 and the novel wordings."""
    runs = [(n, sd, json.load(open(p))) for n in names for sd in seeds
            if os.path.isfile(p := os.path.join(C.out_dir, f"{n}-s{sd}", "ablation.json"))]
    four = lambda res, split: " / ".join(f"{res[split][a]:.2f}" for a in ("color", "shape", "size", "position"))
    print(f"\nWith CFG (w = {C.guidance:g}), {C.repeats} sampling seeds x 27 prompts; color / shape / size / position")
    print("| variant | train seed | sampler | seen | held-out |")
    print("|---|---|---|---|---|")
    for name, seed, r in runs:
        for key, label in (("ddpm1000", "DDPM-1000"), ("ddim25_eta0", "DDIM-25 η=0"), ("ddim10_eta0", "DDIM-10 η=0")):
            if key in r:
                print(f"| {name} | {seed} | {label} | {four(r[key], 'seen')} | {four(r[key], 'held_out')} |")
    print("\nDDIM-25 η=0: without guidance (w = 0, chance is 0.17 / 0.33 / 0.5 / 0.2) and with CFG on the novel wordings")
    print("| variant | train seed | w = 0, seen | w = 0, held-out | novel wordings, seen | novel wordings, held-out |")
    print("|---|---|---|---|---|---|")
    for name, seed, r in runs:
        w0, nv = r["ddim25_eta0_w0"], r["novel_ddim25_eta0"]
        print(f"| {name} | {seed} | {four(w0, 'seen')} | {four(w0, 'held_out')} | {four(nv, 'seen')} | {four(nv, 'held_out')} |")


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    names = [n for n in C.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in C.train_seeds.split(",")]
    if C.speed:
        return speed(C, names)
    if C.jobs == 0:  # a worker: judge the one run it was given
        return judge_run(C, names[0], seeds[0])
    threads = max(1, (os.cpu_count() or 2) // C.jobs)
    with ThreadPoolExecutor(C.jobs) as pool:
        for f in [pool.submit(run_one, C, n, s, threads) for n in names for s in seeds]:
            f.result()
    table(C, names, seeds)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
