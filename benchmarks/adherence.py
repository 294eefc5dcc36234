"""
Score a `shapes` checkpoint: does it draw what it is told?

    python -m benchmarks.adherence --checkpoint=diffusion_results            # latest run
    python -m benchmarks.adherence --checkpoint=... --guidance_scales=0,1,2,3,5 --sampler=dpmpp_2m --steps=8

Samples every prompt of shapes.eval_prompts() (seen and held-out color x shape pairs) at each
guidance scale, judges the images with shapes.judge, prints a table (attribute x guidance scale x
seen/held-out) and writes a PNG plot of adherence against guidance scale next to the checkpoint.
"""

import os
import sys
import time

from checkpoints import build_model, build_scheduler, find_checkpoint, load_checkpoint
from configurator import UserError, parse_config, pick_device, run_cli
from diffusion_model import SamplerConfig
from shapes import sample_adherence
from text_encoders import TextEncoder, embed_prompts

DEFAULTS = dict(
    checkpoint="diffusion_results",
    guidance_scales="0,1,2,3,5",
    sampler="ddim",
    steps=25,
    eta=0.0,
    seed=0,
    repeats=2,
    use_ema=True,
    plot="",
    device="auto",
    guidance_t_min=0,
)
ATTRS = ("color", "shape", "position", "size")


def score(model, scheduler, encoder, settings, scales, seed, repeats, wording="canonical"):
    """Mean adherence over `repeats` seeds with the sampler `settings` (a SamplerConfig) at each guidance
    scale: {w: {split: {attr: frac}}}, and seconds per image.
    wording: the prompts' captions, canonical or novel (templates no training caption uses)."""
    import shapes

    prompts = shapes.eval_prompts(wording)
    cond, uncond = embed_prompts(encoder, [p["caption"] for p in prompts], next(model.parameters()).device)
    total = {w: {s: dict.fromkeys(ATTRS, 0.0) for s in ("seen", "held_out")} for w in scales}
    t0 = time.time()
    for r in range(repeats):
        res = sample_adherence(model, scheduler, prompts, cond, uncond, settings, scales, seed + r)
        for w in scales:
            for split in res[w]:
                for a in ATTRS:
                    total[w][split][a] += res[w][split][a] / repeats
    seconds_per_image = (time.time() - t0) / (repeats * len(scales) * len(prompts))
    return total, seconds_per_image


def load_shapes_checkpoint(where, use_ema, device="cpu"):
    """(path, checkpoint, U-Net, scheduler) of a shapes checkpoint file or run folder: the judge
    only knows the shapes dataset."""
    path = find_checkpoint(where)
    if path is None:
        raise UserError(f"no checkpoint in {where}: pass --checkpoint=<ckpt.pt or run folder>")
    ckpt = load_checkpoint(path)
    if ckpt.get("dataset") != "shapes":
        raise UserError(
            f"{path} was trained on {ckpt.get('dataset', 'another dataset')}: the judge only knows the shapes dataset"
        )
    model = build_model(ckpt, "ema" if use_ema else "model").to(device).eval()
    return path, ckpt, model, build_scheduler(ckpt).to(device)


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    try:
        scales = [float(w) for w in C.guidance_scales.split(",")]
    except ValueError:
        raise UserError(
            f"--guidance_scales={C.guidance_scales}: give numbers separated by commas, e.g. 0,1,3"
        ) from None
    if any(not 0 <= w < float("inf") for w in scales):
        raise UserError(f"--guidance_scales={C.guidance_scales}: every scale must be a finite number >= 0")
    path, ckpt, model, scheduler = load_shapes_checkpoint(C.checkpoint, C.use_ema, pick_device(C.device))
    encoder = TextEncoder(ckpt["text_encoder"])
    S = SamplerConfig(C.sampler, C.steps, C.eta, guidance_t_min=C.guidance_t_min)
    res, spi = score(model, scheduler, encoder, S, scales, C.seed, C.repeats)

    how = (
        f"{C.sampler}"
        + {"ddim": f"-{C.steps} eta={C.eta:g}", "dpmpp_2m": f"-{C.steps}"}.get(C.sampler, "")
        + f", guidance at t >= {C.guidance_t_min}"
    )
    print(
        f"checkpoint {path} (step {ckpt['step']}), {how}, {C.repeats} seeds x "
        f"{len(__import__('shapes').eval_prompts())} prompts, "
        f"{spi:.3f} s/image"
    )
    print("| attribute | split | " + " | ".join(f"w={w:g}" for w in scales) + " |")
    print("|---|---|" + "---|" * len(scales))
    for split in ("seen", "held_out"):
        for a in ATTRS:
            print(
                f"| {a} | {split.replace('_', '-')} | " + " | ".join(f"{res[w][split][a]:.2f}" for w in scales) + " |"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, split in zip(axes, ("seen", "held_out")):
        for a in ATTRS:
            ax.plot(scales, [res[w][split][a] for w in scales], marker="o", label=a)
        ax.set_title(f"{split.replace('_', '-')} color x shape pairs")
        ax.set_xlabel("guidance scale w")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("adherence (judge)")
    axes[1].legend(loc="lower right")
    fig.suptitle(f"step {ckpt['step']}, {how}")
    fig.tight_layout()
    out = C.plot or os.path.join(os.path.dirname(path), "adherence.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
