"""
The README's two ablations: each lever alone and the chosen combination, trained and then judged
with every sampler on the same budget.

    --study=adherence: prediction target, positions, captions (README, "The adherence ablation"), on the
        16 px recipe (config/shapes_16px.py) for the same number of steps;
    --study=32px: the 32 px recipe (config/shapes_cpu.py) against what would also fit its minutes
        (README, "The 32 px recipe"); each variant's steps fill the same wall time.

    # train what is missing, judge, print the table:
    python -m benchmarks.ablation --study=32px --out_dir=ablation32 --jobs=2
    python -m benchmarks.ablation --out_dir=ablation --variants=baseline,v --train_seeds=0,1

Each (variant, training seed) trains in its own process (`--jobs` at a time, the cores split
between them, OMP_NUM_THREADS = cores / jobs) into <out_dir>/<variant>-s<seed>, unless a finished
checkpoint is already there, and is then judged on shapes.eval_prompts() with CFG (w = --guidance)
by DDPM-1000 (only for the variants in --ddpm_variants: 1000 steps of a doubled batch cost 10 CPU
minutes a run), DDIM-25 and DDIM-10 with eta = 0, over --repeats sampling seeds; DDIM-25 eta = 0 also
at w = 0 (chance) and on the novel wordings (templates no training caption uses). Results go to
<run>/ablation.json; the table is printed from those files, so a second call only reprints it.
Training speed is not measured here (runs share the cores): `--speed=true` trains each variant
alone on all cores, one after the other, for --speed_steps steps (200) and prints img/s side by
side, or with --speed_steps=0 its whole run, whose wall time is the budget the 32 px study holds fixed;
--speed_rounds=R alternates the variants R times and prints medians and the ratio of each round.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.adherence import ATTRS, load_shapes_checkpoint, score
from configurator import UserError, parse_config, run_cli
from diffusion_model import SamplerConfig
from text_encoders import TextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CPU recipe (config/shapes_cpu.py) as it was before this ablation: eps, no positions, the six
# caption templates. Each variant changes one thing; "chosen" is the recipe file as it is now.
BEFORE = [
    "--prediction_type=eps",
    "--pos_embed=false",
    "--coord_conv=false",
    "--min_snr_gamma=0",
    "--shapes_captions=six",
]
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
# The 32 px recipe (config/shapes_cpu.py, "chosen") and what else fits its wall time on 2 cores:
# each variant changes one thing and trains as many steps as fit the recipe's minutes (README).
VARIANTS_32 = {
    "chosen": [],
    # no patches: a full-resolution level (1,2,2), attention at 8x8, 0.44x the images/s: 1350 steps
    "full_res": ["--patch_size=1", "--channel_mults=1,2,2", "--attention_levels=2", "--max_steps=1350"],
    "min_snr": ["--min_snr_gamma=5"],
    "eps": ["--prediction_type=eps"],
    "batch64": ["--batch_size=64", "--max_steps=1500"],  # the same images in half the steps
    "steps4500": ["--max_steps=4500"],  # 1.5x the budget: how far more minutes go
    "steps6000": ["--max_steps=6000"],  # 2x
    "16px": ["config/shapes_16px.py"],  # the 16 px recipe, for the side-by-side time (--speed=true)
}
# The Pokémon recipe (config/pokemon_cpu.py) as first trained and one lever changed at a time, each
# on the wall time of 1600 of its steps on 2 cores (~6 minutes alone): variants that cost more per
# step train fewer steps, in proportion to their img/s alone (`--speed=true`, docs/ablations.md).
# Flips were off in that recipe (an older caption rule read Pokédex prose's "nothing left" as a
# side), so the base says --flips=false and "flips" turns them on. Judged by the in-training
# evaluation at the last step (KID, copy share), not by the shapes judge.
SHORT = ["--eval_interval=100000", "--sample_interval=100000", "--max_steps=1600"]
BASE = SHORT + ["--flips=false", "--lr=5e-4", "--min_lr=5e-5"]
VARIANTS_POKEMON = {
    "no_flips": BASE,
    "flips": BASE + ["--flips=true"],
    "64px_p2": BASE + ["--image_size=64", "--patch_size=2"],  # the same U-Net cost at 64 px
    "base64": BASE + ["--base_channels=64", "--max_steps=509"],  # 0.32x the img/s
    "res2": BASE + ["--num_res_blocks=2", "--max_steps=1073"],  # 0.67x
    "dropout": BASE + ["--dropout=0.1"],
    "batch64": BASE + ["--batch_size=64", "--max_steps=786"],  # 0.98x the img/s, 2x the images a step
    "p_uncond0.2": BASE + ["--p_uncond=0.2"],
    "lr1e-3": BASE + ["--lr=1e-3", "--min_lr=1e-4"],
    "lr2e-3": BASE + ["--lr=2e-3", "--min_lr=2e-4"],
}
# Per study: the recipe file, the variants, those trained and judged by default, those also judged
# with DDPM-1000, and where guidance starts (diffusion_model.sample: guidance only at t >= it). The
# adherence study guided every step, as the samplers did then.
STUDIES = {
    "adherence": dict(
        recipe="config/shapes_16px.py",
        variants=VARIANTS,
        default=list(VARIANTS),
        ddpm="baseline,chosen",
        guidance_t_min=0,
    ),
    "32px": dict(
        recipe="config/shapes_cpu.py",
        variants=VARIANTS_32,
        default=["chosen", "full_res", "min_snr", "eps"],
        ddpm="",
        guidance_t_min=300,
    ),
    "pokemon": dict(
        recipe="config/pokemon_cpu.py",
        variants=VARIANTS_POKEMON,
        default=list(VARIANTS_POKEMON),
        ddpm="",
        guidance_t_min=300,
        quality=True,
    ),
}
DEFAULTS = dict(
    study="adherence",
    out_dir="ablation",
    variants="",
    train_seeds="0",
    ddpm_variants="default",
    jobs=2,
    repeats=4,
    guidance_scale=3.0,
    guidance_t_min=-1,
    speed=False,
    speed_steps=200,
    speed_rounds=1,  # -1: the study's
    dataset="",
)  # the pokemon study: a folder instead of the Hub's Pokémon, e.g. ../shared/data/pokedex-art


def command(C, name, *extra):
    """train_diffusion.py's command line for a variant: the study's recipe file (or the variant's
    own, when its first argument is one), then the variant's overrides, then `extra`."""
    recipe, args = STUDIES[C.study]["recipe"], list(STUDIES[C.study]["variants"][name])
    if args and args[0].endswith(".py"):
        recipe = args.pop(0)
    data = [f"--dataset={os.path.abspath(C.dataset)}"] if C.dataset else []
    return [
        sys.executable,
        os.path.join(ROOT, "train_diffusion.py"),
        recipe,
        "--wandb_mode=disabled",
        *data,
        *args,
        *extra,
    ]


def run_one(C, name, seed, threads):
    run_dir = os.path.join(C.out_dir, f"{name}-s{seed}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    done = False
    if os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        done = ckpt["step"] >= ckpt["config"]["max_steps"]
    if not done:
        os.makedirs(run_dir, exist_ok=True)
        cmd = command(C, name, f"--seed={seed}", f"--out_dir={run_dir}", "--resume=auto")
        with open(os.path.join(run_dir, "train.out"), "w") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
        # train_diffusion makes a timestamped run folder inside out_dir: take its checkpoint up one level
        inner = [d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "ckpt.pt"))]
        if inner:  # a run resumed from <run_dir>/ckpt.pt trained in place
            os.replace(os.path.join(run_dir, sorted(inner)[-1], "ckpt.pt"), ckpt_path)
    result_path = os.path.join(run_dir, "ablation.json")
    if os.path.isfile(result_path) or STUDIES[C.study].get("quality"):  # quality: judged while training
        return
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.ablation",
        f"--study={C.study}",
        f"--out_dir={C.out_dir}",
        f"--repeats={C.repeats}",
        f"--guidance_scale={C.guidance_scale}",
        f"--guidance_t_min={C.guidance_t_min}",
        f"--ddpm_variants={C.ddpm_variants}",
        f"--variants={name}",
        f"--train_seeds={seed}",
        "--jobs=0",
    ]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def judge_run(C, name, seed):
    """Score one trained run with every sampler; write <run>/ablation.json."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    run_dir = os.path.join(C.out_dir, f"{name}-s{seed}")
    _, ckpt, model, scheduler = load_shapes_checkpoint(run_dir, True)
    encoder = TextEncoder(ckpt["text_encoder"])
    w, out = C.guidance_scale, {}
    setups = [("ddim25_eta0", "ddim", 25, 0.0), ("ddim10_eta0", "ddim", 10, 0.0)]
    if name in C.ddpm_variants.split(","):
        setups.insert(0, ("ddpm1000", "ddpm", ckpt["num_timesteps"], 1.0))
    for key, sampler, steps, eta in setups:
        scales = [0.0, w] if key == "ddim25_eta0" else [w]
        S = SamplerConfig(sampler, steps, eta if sampler == "ddim" else 0.0, guidance_t_min=C.guidance_t_min)
        res, spi = score(model, scheduler, encoder, S, scales, 0, C.repeats)
        out[key] = res[w]
        if key == "ddim25_eta0":
            out["ddim25_eta0_w0"] = res[0.0]
        print(
            f"{name}-s{seed} {key}: " + " ".join(f"{s}:{a} {res[w][s][a]:.2f}" for s in res[w] for a in ATTRS),
            flush=True,
        )
    S = SamplerConfig("ddim", 25, 0.0, guidance_t_min=C.guidance_t_min)
    res, _ = score(model, scheduler, encoder, S, [w], 0, C.repeats, wording="novel")
    out["novel_ddim25_eta0"] = res[w]
    with open(os.path.join(run_dir, "ablation.json"), "w") as f:
        json.dump(out, f, indent=1)


def speed(C, names):
    """img/s of each variant alone on all cores: over --speed_steps steps (the rate logged after the
    first half), or the whole recipe with --speed_steps=0, whose wall time includes start-up (data,
    caption embeddings) and the in-training evaluations. With --speed_rounds=R the variants take
    turns R times (a, b, a, b, ...), so that a slow spell of a shared machine falls on both; the
    table gives the medians and the ratios of each round."""
    import statistics
    import time

    runs = {name: [] for name in names}  # name -> [(img/s, wall seconds, steps)], one per round
    for rnd in range(C.speed_rounds):
        for name in names:
            run_dir = os.path.join(C.out_dir, "speed", name if C.speed_rounds == 1 else f"{name}-r{rnd}")
            extra = [f"--out_dir={run_dir}"]
            if C.speed_steps:
                extra += [f"--max_steps={C.speed_steps}", "--eval_interval=100000", "--sample_interval=100000"]
            t0 = time.time()
            subprocess.run(
                command(C, name, *extra),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, HF_HUB_OFFLINE="1"),
                cwd=ROOT,
            )
            wall = time.time() - t0
            inner = sorted(os.listdir(run_dir))[-1]
            log = [json.loads(line) for line in open(os.path.join(run_dir, inner, "log.jsonl"))]
            last = max(r["step"] for r in log)
            rates = [r["train/images_per_s"] for r in log if "train/images_per_s" in r and r["step"] > last / 2]
            runs[name].append((sum(rates) / len(rates), wall, last))
            print(f"round {rnd}: {name}: {runs[name][-1][0]:.1f} img/s, {wall:.0f} s for {last} steps", flush=True)
    first = names[0]
    print(
        f"\n| variant | steps | img/s | wall time | img/s ratio to {first} | wall time ratio | img/s ratio by round |"
    )
    print("|---|---|---|---|---|---|---|")
    rate0, wall0 = (statistics.median(x[i] for x in runs[first]) for i in (0, 1))
    for name, rows in runs.items():
        rate, wall = (statistics.median(x[i] for x in rows) for i in (0, 1))
        by_round = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(rows, runs[first]))
        print(
            f"| {name} | {rows[0][2]} | {rate:.1f} | {wall // 60:.0f} min {wall % 60:.0f} s | {rate / rate0:.2f} | "
            f"{wall / wall0:.2f} | {by_round} |"
        )


def table(C, names, seeds):
    """The README's two tables: adherence with CFG by sampler, then w = 0 and the novel wordings."""
    runs = [
        (n, sd, json.load(open(p)))
        for n in names
        for sd in seeds
        if os.path.isfile(p := os.path.join(C.out_dir, f"{n}-s{sd}", "ablation.json"))
    ]
    four = lambda res, split: " / ".join(f"{res[split][a]:.2f}" for a in ("color", "shape", "size", "position"))
    print(
        f"\nWith CFG (w = {C.guidance_scale:g} at t >= {C.guidance_t_min}), {C.repeats} sampling seeds x 27 prompts; "
        "color / shape / size / position"
    )
    print("| variant | train seed | sampler | seen | held-out |")
    print("|---|---|---|---|---|")
    for name, seed, r in runs:
        for key, label in (("ddpm1000", "DDPM-1000"), ("ddim25_eta0", "DDIM-25 η=0"), ("ddim10_eta0", "DDIM-10 η=0")):
            if key in r:
                print(f"| {name} | {seed} | {label} | {four(r[key], 'seen')} | {four(r[key], 'held_out')} |")
    print(
        "\nDDIM-25 η=0: without guidance (w = 0, chance is 0.17 / 0.33 / 0.5 / 0.2) and with CFG on the novel wordings"
    )
    print("| variant | train seed | w = 0, seen | w = 0, held-out | novel wordings, seen | novel wordings, held-out |")
    print("|---|---|---|---|---|---|")
    for name, seed, r in runs:
        w0, nv = r["ddim25_eta0_w0"], r["novel_ddim25_eta0"]
        print(
            f"| {name} | {seed} | {four(w0, 'seen')} | {four(w0, 'held_out')} | {four(nv, 'seen')} | "
            f"{four(nv, 'held_out')} |"
        )


def quality_table(C, names, seeds):
    """The Pokémon study's table: each run's evaluations from its log.jsonl (KID x1000 against the
    held-out art with its spread over subsets, copy share, validation loss)."""
    import glob

    print("\n| variant | train seed | step | KID x1000 | copy share | val loss |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for seed in seeds:
            for log_path in sorted(glob.glob(os.path.join(C.out_dir, f"{name}-s{seed}", "*", "log.jsonl"))):
                for r in (json.loads(line) for line in open(log_path)):
                    if "quality/kid" in r:
                        print(
                            f"| {name} | {seed} | {r['step']} | {r['quality/kid']:.1f} ± {r['quality/kid_std']:.1f} | "
                            f"{r['quality/copy_share']:.3f} | {r['val/loss']:.4f} |"
                        )


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.study not in STUDIES:
        raise UserError(f"--study={C.study} is unknown: use one of {', '.join(STUDIES)}")
    study = STUDIES[C.study]
    variants = study["variants"]
    C.ddpm_variants = study["ddpm"] if C.ddpm_variants == "default" else C.ddpm_variants
    C.guidance_t_min = study["guidance_t_min"] if C.guidance_t_min < 0 else C.guidance_t_min
    names = [n for n in (C.variants or ",".join(study["default"])).split(",") if n]
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)} in --study={C.study}; known: {', '.join(variants)}")
    seeds = [int(s) for s in C.train_seeds.split(",")]
    if C.speed:
        if C.speed_rounds < 1:
            raise UserError(f"--speed_rounds={C.speed_rounds}: give 1 or more rounds")
        return speed(C, names)
    if C.jobs == 0:  # a worker: judge the one run it was given
        return judge_run(C, names[0], seeds[0])
    threads = max(1, (os.cpu_count() or 2) // C.jobs)
    with ThreadPoolExecutor(C.jobs) as pool:
        for f in [pool.submit(run_one, C, n, s, threads) for n in names for s in seeds]:
            f.result()
    (quality_table if study.get("quality") else table)(C, names, seeds)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
