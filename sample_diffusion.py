"""
Draw images from a trained checkpoint. Edit the constants below, or override any of them:

    python sample_diffusion.py
    python sample_diffusion.py --condition="a small blue square in the top left" --num_images=8

Writes into out_dir:
    generated_image_pokemon.png       the plain conditional model (guidance_scale = 1, no guidance)
    generated_image_pokemon_cfg.png   classifier-free guidance at guidance_scale (at noise levels t >= guidance_t_min),
                                      and toward the focus at focus_scale where one is given
With num_images > 1 each file is a grid (of the first 64), and every image is also written alone
(generated_image_pokemon_000.png, ..., generated_image_pokemon_cfg_000.png, ...), sampled
batch_size at a time. Both runs start from the same noise, so the two files differ only by the guidance.
"""

import os
import sys

import torch

from checkpoints import build_model, build_scheduler, check_output_dir, find_checkpoint, load_checkpoint
from configurator import DEVICES, UserError, collect_settings, parse_config, pick_device, run_cli
from diffusion_model import SAMPLERS, SamplerConfig, image_generators, sample
from image_data import save_grid
from text_encoders import TextEncoder, embed_prompts

# -----------------------------------------------------------------------------
# settings: every global below can be overridden as --key=value
_before_settings = set(globals())
checkpoint = ""  # a ckpt.pt or a run folder; "" = the latest run in out_dir
condition = "a large red circle in the center"  # the prompt; "" is the unconditional prompt (the model's own prior)
guidance_scale = 3.0  # CFG weight w: out = out_u + w (out_c - out_u); 3 judges the shapes recipes, 6 CPU Pokémon
# guide only at noise levels t >= this, the conditional model below (guiding the nearly clean steps bends unseen pairs
# into seen ones); 0 guides every step
guidance_t_min = 300
# a part of the prompt to weigh more, guided toward on its own at the same steps (composable diffusion): the _cfg
# image's out = out_u + w (out_c - out_u) + focus_scale (out_focus - out_u); e.g. a Pokémon caption's type,
# focus="a fire type pokemon" (docs/results.md)
focus = ""
focus_scale = 0.0
num_images = 4  # images per file
batch_size = 64  # images sampled at once (memory); the images do not depend on it
# ddpm (all T steps, Ho et al.) | ddim (Song et al.) | dpmpp_2m (DPM-Solver++(2M), Lu et al.): `steps` steps
sampler = "ddpm"
steps = 25  # ddim and dpmpp_2m steps, 1..T
eta = 0.0  # DDIM noise: 0 deterministic (Song et al.), 1 stochastic like DDPM; ddim only
seed = 0  # same seed + same checkpoint + same device = byte-identical PNGs
use_ema = True  # sample with the EMA weights (smoother, better) rather than the last training weights
save_trajectory = False  # also write generated_image_pokemon_trajectory.png: x_t (top) and predicted x0 (bottom)
out_dir = "diffusion_results"
device = "auto"  # auto (CUDA, else Apple's mps, else the CPU) | cuda | mps | cpu
# -----------------------------------------------------------------------------
DEFAULTS = collect_settings(globals(), _before_settings)
# The valid values of the settings (configurator.py reads the notation); a setting without one is type-checked only.
RANGES = dict(
    checkpoint="text",
    condition="text",
    guidance_scale="[0, 100]",
    guidance_t_min="[0, 100000]",
    focus="text",
    focus_scale="[0, 100]",
    num_images="[1, 1000000]",
    batch_size="[1, 4096]",
    sampler=tuple(SAMPLERS),
    steps="[1, 100000]",
    eta="[0, 1]",
    seed="[0, 2147483647]",
    use_ema="bool",
    save_trajectory="bool",
    out_dir="nonempty",
    device=DEVICES,
)
NAME = "generated_image_pokemon"
GRID_MAX = 64  # the grid PNG shows at most this many images; every image is also written alone


def main(argv):
    C, explicit = parse_config(argv, DEFAULTS, RANGES)
    dev = pick_device(C.device)
    check_output_dir(C.out_dir)  # before the minutes of sampling, not after
    S = SamplerConfig.from_settings(C)  # the sampler; its guidance_scale is the _cfg image's
    for key, why in S.unused().items():
        if key in explicit:
            print(f"warning: --{key} has no effect: {why}", file=sys.stderr)
    if C.focus_scale > 0 and not C.focus:
        raise UserError(
            f"--focus_scale={C.focus_scale:g} needs a focus: pass the part of the prompt to weigh more, "
            'e.g. --focus="a fire type pokemon"'
        )
    if C.focus and C.focus_scale == 0:
        print("warning: --focus has no effect: focus_scale is 0 (pass --focus_scale=1, say)", file=sys.stderr)

    where = C.checkpoint or C.out_dir
    path = find_checkpoint(where)
    if path is None:
        raise UserError(
            f"no checkpoint in {where}: train one with python train_diffusion.py, "
            "or pass --checkpoint=<ckpt.pt or run folder>"
        )
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, "ema" if C.use_ema else "model").to(dev).eval()
    scheduler = build_scheduler(ckpt).to(dev)
    T = scheduler.num_timesteps
    if C.sampler != "ddpm" and not 1 <= C.steps <= T:
        name = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}[C.sampler]
        raise UserError(f"--steps={C.steps} is out of range: {name} takes 1 to {T} steps")

    # the encoder the model was trained with, never another: its features are what the model reads
    encoder = TextEncoder(ckpt["text_encoder"], dev)
    if encoder.dim != model.cfg.context_dim:
        raise UserError(
            f"text encoder {ckpt['text_encoder']} gives {encoder.dim}-d tokens but the model was trained on "
            f"{model.cfg.context_dim}-d ones: that folder now holds another encoder; "
            "restore the one it was trained with"
        )
    prompt = C.condition
    if prompt == "":
        print(
            "note: the empty prompt is the unconditional prompt: both images show the model's prior, "
            "guidance changes nothing"
        )
    if encoder.count_truncated([prompt]):
        print(f"warning: the prompt is longer than {encoder.max_length} tokens and was cut there", file=sys.stderr)
    cond, uncond = embed_prompts(encoder, [prompt], dev)
    focus = embed_prompts(encoder, [C.focus], dev)[0] if C.focus_scale else None  # the sampler pads the lengths
    del encoder
    how = {"ddpm": "ddpm, all steps", "ddim": f"ddim, {C.steps} steps, eta {C.eta:g}"}.get(
        C.sampler, f"{C.sampler}, {C.steps} steps"
    )
    print(
        f"checkpoint {path} (step {ckpt['step']}, {ckpt['dataset']}, predicts {scheduler.prediction_type}, "
        f"text encoder {ckpt['text_encoder']}) | {how} | {dev}"
    )

    try:
        os.makedirs(C.out_dir, exist_ok=True)
    except OSError as e:  # gone read-only or full since the check above
        raise UserError(f"cannot create --out_dir={C.out_dir} ({e.strerror or e}): pass a writable --out_dir") from None
    trajectory = []
    keep = set(torch.linspace(0, (T if C.sampler == "ddpm" else C.steps) - 1, 8).round().long().tolist())

    def record(i, t, x_t, x0):
        if i in keep:
            trajectory.append((x_t[:1].cpu(), x0[:1].cpu()))

    for suffix, w, w_f in (("", 1.0, 0.0), ("_cfg", C.guidance_scale, C.focus_scale)):
        grid = []
        for start in range(0, C.num_images, C.batch_size):
            n = min(C.batch_size, C.num_images - start)
            # image i has its own noise stream, seeded by (seed, i): the same bytes whatever the batch size
            images = sample(
                model,
                scheduler,
                (cond[0].expand(n, -1, -1), cond[1].expand(n, -1)),
                uncond,
                S,
                generator=image_generators(C.seed, n, start),
                progress=True,
                callback=record if (C.save_trajectory and suffix == "_cfg" and start == 0) else None,
                focus=focus,
                guidance_scale=w,
                focus_scale=w_f,
            )
            grid.append(images[: max(0, GRID_MAX - start)].cpu())
            if C.num_images > 1:
                for i, img in enumerate(images, start):
                    save_grid(img[None], os.path.join(C.out_dir, f"{NAME}{suffix}_{i:03d}.png"))
        grid = torch.cat(grid)
        save_grid(grid, os.path.join(C.out_dir, f"{NAME}{suffix}.png"), nrow=min(8, len(grid)))
        print(
            f"wrote {os.path.join(C.out_dir, NAME + suffix + '.png')} (guidance {w:g}"
            + (f", focus {C.focus!r} at {w_f:g}" if w_f else "")
            + (f", {len(grid)} of {C.num_images} images; each one is also written alone" if C.num_images > 1 else "")
            + f"): {prompt!r}"
        )
    if C.save_trajectory:
        strip = torch.cat([torch.cat([x_t for x_t, _ in trajectory]), torch.cat([x0 for _, x0 in trajectory])])
        path = os.path.join(C.out_dir, f"{NAME}_trajectory.png")
        save_grid(strip.clamp(-1, 1), path, nrow=len(trajectory))
        print(f"wrote {path}: x_t (top) and predicted x0 (bottom) at {len(trajectory)} of the steps")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
