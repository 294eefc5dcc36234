"""
Quality against the number of U-Net evaluations, for every sampler, on one checkpoint: DDPM over all
T steps, DDIM (at each --etas) and DPM-Solver++(2M) with a few steps each, all with the same guidance.

    python -m benchmarks.bench_sampling --checkpoint=diffusion_results          # a shapes run: the judge
    python -m benchmarks.bench_sampling --checkpoint=<run> --dataset=../shared/data/pokedex-art  # KID
    python -m benchmarks.bench_sampling --samplers=ddim25,dpmpp8 --etas=0,1 --table=out.tsv

Samplers are named ddpm, ddim<steps> or dpmpp<steps>. On a shapes checkpoint every sampler draws the
27 prompts of shapes.eval_prompts() `repeats` times (seeds seed, seed+1, ...) and the judge scores
them (benchmarks/adherence.py's score): the never-seen (held-out) color x shape pairs are the
columns that matter. On an image-folder checkpoint (--dataset) every sampler draws one image per
held-out caption, with training's evaluation noise for the run's seed, and KID x 1000 (with its
spread over subsets) is measured against the held-out art (image_quality.py), as training's
evaluation does. A forward hook counts U-Net evaluations per image: a guided step is one forward
of a doubled batch, two evaluations. s/image is wall time over the images drawn (judge included),
after a short warm-up. --table writes the rows as tab-separated values for docs/make_plots.py.
"""

import sys
import time

import torch

import shapes
from benchmarks.adherence import ATTRS, score
from checkpoints import build_model, build_scheduler, find_checkpoint, load_checkpoint
from configurator import UserError, parse_config, pick_device, run_cli
from diffusion_model import SamplerConfig, image_generators, sample
from text_encoders import TextEncoder, embed_prompts

DEFAULTS = dict(
    checkpoint="diffusion_results",
    dataset="",  # an image-folder checkpoint: its folder, for KID against the held-out art
    samplers="ddpm,ddim10,ddim25,ddim50,dpmpp5,dpmpp8,dpmpp10,dpmpp15,dpmpp20",
    etas="0",
    guidance_scale=3.0,
    guidance_t_min=300,
    repeats=2,
    seed=0,
    table="",
    device="auto",
    use_ema=True,
)
PREFIXES = {"ddim": "ddim", "dpmpp": "dpmpp_2m"}


def parse_samplers(text, num_timesteps, etas=(0.0,)):
    """ "ddpm,ddim50,dpmpp8" with etas (0, 1) -> SamplerConfigs: DDPM once, DDIM-50 at each eta, DPM-Solver++-8."""
    samplers = []
    for name in text.split(","):
        name = name.strip()
        prefix = name.rstrip("0123456789")
        steps = name[len(prefix) :]
        if name == "ddpm":
            samplers.append(SamplerConfig("ddpm"))
        elif prefix in PREFIXES and steps and 1 <= int(steps) <= num_timesteps:
            for eta in etas if prefix == "ddim" else (0.0,):
                samplers.append(SamplerConfig(PREFIXES[prefix], int(steps), eta))
        else:
            raise UserError(
                f"--samplers: cannot read {name!r}: use ddpm, ddim<steps> or dpmpp<steps> with "
                f"1 <= steps <= {num_timesteps}, e.g. ddpm,ddim25,dpmpp8"
            )
    return samplers


def label(S):
    return {"ddpm": "ddpm", "ddim": f"ddim{S.steps} eta={S.eta:g}"}.get(S.sampler, f"dpmpp{S.steps}")


def kid_judge(ckpt, model, scheduler, dataset, device):
    """For an image-folder checkpoint: a function S -> {kid, kid_std} over one sample per held-out caption."""
    import image_quality as iq
    from image_data import load_art

    if not iq.available():
        raise UserError(f"KID needs the metric's packages: {iq.INSTALL_HINT}")
    C = ckpt["config"]
    _, _, held, cap_held = load_art(dataset, model.cfg.image_size, C["seed"], C["val_fraction"], C["eval_images"])
    fe = iq.FeatureExtractor(device)
    f_held = fe(held)
    cond, uncond = embed_prompts(TextEncoder(ckpt["text_encoder"], device), cap_held, device)

    def judge(S):
        images = sample(model, scheduler, cond, uncond, S, generator=image_generators(C["seed"], len(cap_held)))
        kid, kid_std = iq.kid(f_held, fe(images))
        return dict(kid=kid, kid_std=kid_std), len(cap_held)

    return judge


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.repeats < 1:
        raise UserError("--repeats must be >= 1")
    device = pick_device(C.device)
    path = find_checkpoint(C.checkpoint)
    if path is None:
        raise UserError(f"no checkpoint in {C.checkpoint}: pass --checkpoint=<ckpt.pt or run folder>")
    ckpt = load_checkpoint(path)
    if ckpt["dataset"] != "shapes" and not C.dataset:
        raise UserError(f"{path} was trained on {ckpt['dataset']}: pass --dataset=<its folder> to measure KID")
    try:
        etas = [float(e) for e in C.etas.split(",")]
    except ValueError:
        raise UserError(f"--etas={C.etas}: give numbers separated by commas, e.g. 0,1") from None
    if any(not 0 <= e <= 1 for e in etas):
        raise UserError(f"--etas={C.etas}: eta must be in [0, 1]")
    samplers = parse_samplers(C.samplers, ckpt["num_timesteps"], etas)
    model = build_model(ckpt, "ema" if C.use_ema else "model").to(device).eval()
    scheduler = build_scheduler(ckpt).to(device)
    guided = lambda S: SamplerConfig(S.sampler, S.steps, S.eta, C.guidance_scale, C.guidance_t_min)

    if ckpt["dataset"] == "shapes":
        encoder = TextEncoder(ckpt["text_encoder"])
        n_images = len(shapes.eval_prompts()) * C.repeats

        def judge(S):
            res, _ = score(model, scheduler, encoder, S, [S.guidance_scale], C.seed, C.repeats)
            w = S.guidance_scale
            flat = {f"{split}_{a}": res[w][split][a] for split in ("held_out", "seen") for a in ATTRS}
            return flat, n_images
    else:
        judge = kid_judge(ckpt, model, scheduler, C.dataset, device)

    evaluations = []  # images carried by every U-Net call
    model.register_forward_hook(lambda module, inputs, output: evaluations.append(inputs[0].shape[0]))
    judge(guided(SamplerConfig("ddim", 2)))  # warm-up, not reported
    print(
        f"checkpoint {path} (step {ckpt['step']}, {ckpt['dataset']}) on {device}, guidance {C.guidance_scale:g} "
        f"at t >= {C.guidance_t_min}"
    )
    rows = []
    for S in map(guided, samplers):
        evaluations.clear()
        t0 = time.time()
        figures, n = judge(S)
        seconds = time.time() - t0
        steps = len(S.timesteps(ckpt["num_timesteps"]))
        rows.append(dict(sampler=label(S), steps=steps, evals=sum(evaluations) / n, s_per_image=seconds / n, **figures))
        print(
            "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True
        )

    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if C.table:
        with open(C.table, "w") as f:
            f.write("\t".join(keys) + "\n")
            f.writelines("\t".join(str(r[k]) for k in keys) + "\n" for r in rows)
        print(f"wrote {C.table}")
    return rows


if __name__ == "__main__":
    with torch.no_grad():
        run_cli(main, sys.argv[1:])
