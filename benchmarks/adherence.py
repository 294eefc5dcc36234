"""
Score a `shapes` checkpoint: does it draw what it is told?

    python -m benchmarks.adherence --checkpoint=diffusion_results            # latest run
    python -m benchmarks.adherence --checkpoint=... --guidance_scales=0,1,2,3,5 --sampler=dpmpp_2m --steps=8
    python -m benchmarks.adherence --checkpoint=... --prompts=my_prompts.txt   # your own, one per line

Samples every prompt of shapes.eval_prompts() (seen and held-out color x shape pairs) at each
guidance scale, judges the images with shapes.judge, prints a table (attribute x guidance scale x
seen/held-out) and writes a PNG plot of adherence against guidance scale next to the checkpoint.
A checkpoint trained with scenes (shapes_scenes > 0) is also scored on shapes.scene_prompts():
two objects, count / binding / position on seen and never-seen pairings. --prompts scores a file of
prompts instead, each of one or two objects (shapes.parse_prompt; one it cannot read is refused
in one line before anything is loaded), with the same three scores per prompt.
"""

import os
import sys
import time

from checkpoints import build_model, build_scheduler, find_checkpoint, load_checkpoint
from configurator import UserError, parse_config, pick_device, run_cli
from diffusion_model import SamplerConfig, image_generators, sample
from shapes import parse_prompt, sample_adherence, scene_adherence, scene_prompts
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
    prompts="",
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


SCENE_SCORES = ("count", "binding", "position")


def read_prompts(path):
    """[(text, objects)] of a file of prompts, one per line (blank lines skipped); a line the judge cannot read
    stops the benchmark in one line that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"--prompts={path}: cannot read it ({e}): pass a UTF-8 text file, one prompt per line"
        ) from None
    if not lines:
        raise UserError(f"--prompts={path} holds no prompt: write one per line")
    prompts = []
    for i, text in lines:
        try:
            prompts.append((text, parse_prompt(text)))
        except ValueError as e:
            raise UserError(f"{path} line {i}: {e}") from None
    return prompts


def score_prompts(model, scheduler, encoder, settings, scales, seed, repeats, prompts):
    """{text: {w: {count, binding, position}}} over `repeats` seeds for prompts [(text, objects)]."""
    texts = [t for t, _ in prompts]
    cond, uncond = embed_prompts(encoder, texts, next(model.parameters()).device)
    res = {t: {w: dict.fromkeys(SCENE_SCORES, 0.0) for w in scales} for t in texts}
    for r in range(repeats):
        for w in scales:
            images = sample(
                model,
                scheduler,
                cond,
                uncond,
                settings,
                generator=image_generators(seed + r, len(texts)),
                guidance_scale=w,
            )
            for i, (text, objects) in enumerate(prompts):
                for k, v in scene_adherence(images[i : i + 1].float().cpu(), [objects]).items():
                    res[text][w][k] += v / repeats
    return res


def score_scenes(model, scheduler, encoder, settings, scales, seed, repeats):
    """{split: {w: {count, binding, position}}} of shapes.scene_prompts() over `repeats` seeds."""
    prompts = scene_prompts()
    cond, uncond = embed_prompts(encoder, [p["caption"] for p in prompts], next(model.parameters()).device)
    total = {s: {w: dict.fromkeys(SCENE_SCORES, 0.0) for w in scales} for s in ("seen", "held_out")}
    for r in range(repeats):
        res = sample_adherence(model, scheduler, prompts, cond, uncond, settings, scales, seed + r)
        for w in scales:
            for split in total:
                for k in SCENE_SCORES:
                    total[split][w][k] += res[w][split][k] / repeats
    return total


def print_table(what, rows):
    """A markdown table: one row per (name, {w: {count, binding, position}}), a column per score and scale."""
    scales = list(rows[0][1])
    print(f"| {what} | " + " | ".join(f"{k} w={w:g}" for k in SCENE_SCORES for w in scales) + " |")
    print("|---|" + "---|" * (len(SCENE_SCORES) * len(scales)))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[w][k]:.2f}" for k in SCENE_SCORES for w in scales) + " |")


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
    own = read_prompts(C.prompts) if C.prompts else None
    path, ckpt, model, scheduler = load_shapes_checkpoint(C.checkpoint, C.use_ema, pick_device(C.device))
    encoder = TextEncoder(ckpt["text_encoder"])
    S = SamplerConfig(C.sampler, C.steps, C.eta, guidance_t_min=C.guidance_t_min)
    how = (
        f"{C.sampler}"
        + {"ddim": f"-{C.steps} eta={C.eta:g}", "dpmpp_2m": f"-{C.steps}"}.get(C.sampler, "")
        + f", guidance at t >= {C.guidance_t_min}"
    )
    if own is not None:
        res = score_prompts(model, scheduler, encoder, S, scales, C.seed, C.repeats, own)
        print(f"checkpoint {path} (step {ckpt['step']}), {how}, {C.repeats} seeds per prompt")
        print_table(
            "prompt", [(f"{text} ({len(objs)} object{'s' * (len(objs) > 1)})", res[text]) for text, objs in own]
        )
        return res
    res, spi = score(model, scheduler, encoder, S, scales, C.seed, C.repeats)
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

    if ckpt["config"].get("shapes_scenes", 0) > 0:
        scenes = score_scenes(model, scheduler, encoder, S, scales, C.seed, C.repeats)
        print(f"two objects: {len(scene_prompts())} prompts x {C.repeats} seeds (shapes.scene_prompts())")
        print_table("pairings", [(split.replace("_", "-"), scenes[split]) for split in ("seen", "held_out")])
        res = dict(one=res, two=scenes)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    one = res["one"] if "one" in res else res
    for ax, split in zip(axes, ("seen", "held_out")):
        for a in ATTRS:
            ax.plot(scales, [one[w][split][a] for w in scales], marker="o", label=a)
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
