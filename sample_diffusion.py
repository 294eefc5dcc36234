"""
Draw images from a trained checkpoint. Edit the constants below, or override any of them:

    python sample_diffusion.py
    python sample_diffusion.py --condition="a small blue square in the top left" --num_images=8

Writes into out_dir:
    generated_image_pokemon.png       the plain conditional model (guidance_scale = 1, no guidance)
    generated_image_pokemon_cfg.png   classifier-free guidance at guidance_scale
With num_images > 1 each file is a grid, and every image is also written alone
(generated_image_pokemon_000.png, ..., generated_image_pokemon_cfg_000.png, ...).
Both runs start from the same noise, so the two files differ only by the guidance.
"""

import os
import sys

import torch

from diffusion_model import sample
from train_diffusion import (UserError, TextEncoder, build_model, build_scheduler, embed_prompts, find_checkpoint, load_checkpoint, pick_device,
                             parse_overrides, run_cli, save_grid)

# -----------------------------------------------------------------------------
checkpoint = ""  # a ckpt.pt or a run folder; "" = the latest run in out_dir
condition = "a large red circle in the center"  # the prompt; "" is the unconditional prompt (the model's own prior)
guidance_scale = 3.0  # CFG weight w: eps = eps_u + w (eps_c - eps_u); 3 gave the best adherence on shapes (README)
num_images = 4  # images per file
sampler = "ddpm"  # ddpm (all T steps, Ho et al.) | ddim (Song et al., `steps` steps)
steps = 50  # DDIM steps, 1..T
eta = 1.0  # DDIM noise: 1 stochastic like DDPM (keeps up with DDPM's adherence, README), 0 deterministic (Song et al.)
seed = 0  # same seed + same checkpoint + same device = byte-identical PNGs
use_ema = True  # sample with the EMA weights (smoother, better) rather than the last training weights
save_trajectory = False  # also write generated_image_pokemon_trajectory.png: x_t (top) and predicted x0 (bottom)
out_dir = "diffusion_results"
device = "auto"  # auto | cuda | cpu
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
NAME = "generated_image_pokemon"


def main(argv):
    C = parse_overrides(argv, DEFAULTS)
    if C["sampler"] not in ("ddpm", "ddim"):
        raise UserError(f"unknown sampler {C['sampler']!r}: use --sampler=ddpm or --sampler=ddim")
    if not 0 <= C["guidance_scale"] < float("inf"):  # written so that nan fails too
        raise UserError(f"guidance_scale {C['guidance_scale']} must be a finite number >= 0: "
                        f"use 0 (unconditional), 1 (no guidance) or more")
    if C["sampler"] == "ddim" and C["steps"] < 1:  # the upper bound, T, is known once the checkpoint is read
        raise UserError(f"steps {C['steps']} is out of range: DDIM takes at least 1 step")
    if C["num_images"] < 1:
        raise UserError(f"num_images {C['num_images']} must be at least 1")
    if not 0 <= C["eta"] <= 1:
        raise UserError(f"eta {C['eta']} must lie in [0, 1]")
    dev = pick_device(C["device"])

    where = C["checkpoint"] or C["out_dir"]
    path = find_checkpoint(where)
    if path is None:
        raise UserError(f"no checkpoint in {where}: train one with python train_diffusion.py, or pass --checkpoint=<ckpt.pt or run folder>")
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, "ema" if C["use_ema"] else "model").to(dev).eval()
    scheduler = build_scheduler(ckpt).to(dev)
    T = scheduler.num_timesteps
    if C["sampler"] == "ddim" and not 1 <= C["steps"] <= T:
        raise UserError(f"steps {C['steps']} is out of range: DDIM takes 1 to {T} steps")

    # the encoder the model was trained with, never another: its features are what the model reads
    encoder = TextEncoder(ckpt["text_encoder"], dev)
    prompt = C["condition"]
    if prompt == "":
        print("note: the empty prompt is the unconditional prompt: both images show the model's prior, guidance changes nothing")
    if encoder.count_truncated([prompt]):
        print(f"warning: the prompt is longer than {encoder.max_length} tokens and was cut there", file=sys.stderr)
    cond, uncond = embed_prompts(encoder, [prompt] * C["num_images"], dev)
    del encoder
    how = "ddpm, all steps" if C["sampler"] == "ddpm" else f"ddim, {C['steps']} steps, eta {C['eta']}"
    print(f"checkpoint {path} (step {ckpt['step']}, {ckpt['dataset']}, text encoder {ckpt['text_encoder']}) | {how} | {dev}")

    os.makedirs(C["out_dir"], exist_ok=True)
    trajectory = []
    keep = set(torch.linspace(0, (T if C["sampler"] == "ddpm" else C["steps"]) - 1, 8).round().long().tolist())

    def record(i, t, x_t, x0):
        if i in keep:
            trajectory.append((x_t[:1].cpu(), x0[:1].cpu()))

    common = dict(sampler=C["sampler"], steps=C["steps"], eta=C["eta"], progress=True)
    for suffix, w in (("", 1.0), ("_cfg", C["guidance_scale"])):
        images = sample(model, scheduler, cond, uncond, guidance_scale=w, generator=C["seed"],
                        callback=record if (C["save_trajectory"] and suffix == "_cfg") else None, **common)
        save_grid(images, os.path.join(C["out_dir"], f"{NAME}{suffix}.png"), nrow=min(8, C["num_images"]))
        if C["num_images"] > 1:
            for i, img in enumerate(images):
                save_grid(img[None], os.path.join(C["out_dir"], f"{NAME}{suffix}_{i:03d}.png"))
        print(f"wrote {os.path.join(C['out_dir'], NAME + suffix + '.png')} (guidance {w:g}): {prompt!r}")
    if C["save_trajectory"]:
        strip = torch.cat([torch.cat([x_t for x_t, _ in trajectory]), torch.cat([x0 for _, x0 in trajectory])])
        path = os.path.join(C["out_dir"], f"{NAME}_trajectory.png")
        save_grid(strip.clamp(-1, 1), path, nrow=len(trajectory))
        print(f"wrote {path}: x_t (top) and predicted x0 (bottom) at {len(trajectory)} of the steps")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
