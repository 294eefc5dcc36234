"""
Memorisation you can see: each sample of a checkpoint next to its nearest training image in the
metric's features (EfficientNet-Lite0, image_quality.py), with the similarity of the pair and the
copy threshold (the 99th percentile of held-out art's nearest similarity to the training art).

    python docs/make_nearest_figure.py diffusion_results/<run> --dataset=../shared/data/pokedex-art \
        --out docs/pokemon_cpu_nearest.png

The samples are training's evaluation samples: one per held-out caption, the run's sampler, guidance
and per-image noise (its seed). The figure shows the `--pairs` samples closest to a training image
(the ones most likely to be copies) in columns of (sample, nearest training image), and prints the
share of all samples above the threshold, which the in-training evaluation logs as quality/copy_share.
"""

import argparse
import os
import sys
from dataclasses import fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import image_quality as iq  # noqa: E402
from checkpoints import build_model, build_scheduler, find_checkpoint, load_checkpoint  # noqa: E402
from diffusion_model import SamplerConfig, image_generators, sample  # noqa: E402
from image_data import load_art, save_grid  # noqa: E402
from text_encoders import TextEncoder, embed_prompts  # noqa: E402


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run", help="a run folder or ckpt.pt of an image-folder dataset")
    p.add_argument("--dataset", required=True, help="the folder it was trained on")
    p.add_argument("--pairs", type=int, default=16, help="how many (sample, nearest) pairs to show")
    p.add_argument("--out", default="", help="the PNG (default: nearest.png next to the checkpoint)")
    p.add_argument("--scale", type=int, default=3, help="enlarge the figure this many times (nearest neighbour)")
    # the sampler: by default the run's own (its evaluation's images)
    for key, kind in (
        ("sampler", str),
        ("steps", int),
        ("eta", float),
        ("guidance_scale", float),
        ("guidance_t_min", int),
    ):
        p.add_argument(f"--{key}", type=kind, default=None, help=f"default: the run's {key}")
    args = p.parse_args()

    path = find_checkpoint(args.run)
    if path is None:
        sys.exit(f"error: no checkpoint in {args.run}")
    ckpt = load_checkpoint(path)
    C = argparse.Namespace(**ckpt["config"])
    size = ckpt["model_args"]["image_size"]
    train, _, held, cap_held = load_art(args.dataset, size, C.seed, C.val_fraction, C.eval_images)
    model, scheduler = build_model(ckpt, "ema").eval(), build_scheduler(ckpt)
    cond, uncond = embed_prompts(TextEncoder(ckpt["text_encoder"]), cap_held, torch.device("cpu"))
    given = {f.name: getattr(args, f.name) for f in fields(SamplerConfig) if getattr(args, f.name) is not None}
    S = SamplerConfig(**{**{f.name: getattr(C, f.name) for f in fields(SamplerConfig) if hasattr(C, f.name)}, **given})
    samples = sample(model, scheduler, cond, uncond, S, generator=image_generators(C.seed, len(cap_held)))

    fe = iq.FeatureExtractor()
    f_train, f_held, f_samples = fe(train), fe(held), fe(samples)
    threshold = iq.copy_threshold(f_held, f_train)
    sim = (
        torch.nn.functional.normalize(f_samples.double(), dim=1)
        @ torch.nn.functional.normalize(f_train.double(), dim=1).T
    )  # (N_samples, N_train)
    best, nearest = sim.max(1)
    order = best.argsort(descending=True)[: args.pairs]
    print(
        f"{path} (step {ckpt['step']}, {S.sampler}-{S.steps}): copy threshold {threshold:.4f}; "
        f"{(best > threshold).double().mean().item():.3f} of {len(best)} samples above it"
    )
    for i in order.tolist():
        flag = "COPY" if best[i] > threshold else ""
        print(f"  similarity {best[i].item():.4f} {flag:4s} caption {cap_held[i][:70]!r}")
    top = samples[order].cpu()  # (P, 3, S, S): sample row
    bottom = train[nearest[order]].float() / 127.5 - 1  # (P, 3, S, S): its nearest training image
    grid = torch.cat([top, bottom])
    if args.scale > 1:
        grid = grid.repeat_interleave(args.scale, dim=2).repeat_interleave(args.scale, dim=3)
    out = args.out or os.path.join(os.path.dirname(path), "nearest.png")
    save_grid(grid, out, nrow=len(top))
    print(f"wrote {out}: top row the samples most similar to a training image, bottom row that image")


if __name__ == "__main__":
    main()
