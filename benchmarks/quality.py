"""
The real-image metric of image_quality.py, on real art and on checkpoints.

    python -m benchmarks.quality --dataset=../shared/data/pokedex-art --image_size=32     # the metric's validation
    python -m benchmarks.quality --dataset=../shared/data/pokedex-art --checkpoint=RUN    # a trained model

Both split the folder as train_diffusion.py does (--seed, --val_fraction, --eval_images; a
checkpoint brings its own), so "held-out" is art the model never saw.

Validation (no checkpoint), as FID was validated (Heusel et al. 2017): the floor (KID of two
random halves of all the art, and of unaltered training art against the held-out art), training
art degraded by Gaussian blur and by added noise at three strengths against the held-out art
(KID must rise with each), the copy check on training art presented as samples (share near 1) and
on held-out art (threshold from one half of it, share measured on the other: near 0.01), and the
type probe's ceiling (held-out real art) and floor (the majority type).

A checkpoint: one sample per held-out caption (EMA weights, --sampler with --steps (and --eta for
ddim), CFG --guidance_scale at t >= --guidance_t_min, and with --focus_scale > 0 guidance toward each caption's
type alone at the same steps, "a fire type pokemon"; with --drop_name=true from the captions without their first
part, pokedex-art's name of a Pokémon the model never saw), then KID, FD and the copy share against the held-out art,
the paired test of captions (does each sample look more like its own caption's art than like the
art of the other captions? KID cannot say: shuffling the captions leaves the set of art the same),
and the type probe's accuracy on the samples. With --draws=N, N draws (sample seeds --sample_seed and up), each
scored, then their means: what a goal on KID should be read on. Writes a grid of the first draw's first 8 samples
over their real art next to the checkpoint.
"""

import json
import os
import sys
import time

import torch

import image_quality as iq
from configurator import UserError, parse_config, pick_device, run_cli
from image_data import IMAGE_SUFFIXES, load_art, save_grid, without_name

DEFAULTS = dict(
    dataset="",
    checkpoint="",
    image_size=32,
    seed=0,
    val_fraction=0.2,
    eval_images=256,
    sampler="dpmpp_2m",
    steps=8,
    eta=0.0,
    guidance_scale=3.0,
    guidance_t_min=300,
    focus_scale=0.0,  # guidance toward each held-out caption's type phrase (image_quality.type_phrase)
    drop_name=False,  # sample from the held-out captions without their first part (image_data.without_name)
    sample_seed=0,
    # > 1: draw again with sample seeds sample_seed + 1, ...; KID, FD, the copy share and the probe are each draw's,
    # then their means (one draw of one sample per caption moves KID by several of its spreads: docs/ablations.md)
    draws=1,
    weights="ema",  # ema (what training evaluates) | model (the raw weights: what the EMA buys)
    device="auto",
    out="",  # the grid of samples over their real art (.png or .jpg); default: beside the checkpoint
)


def probe_scores(fe_train, cap_train, fe_held, cap_held):
    """The type probe fitted on training art: (probe, ceiling on held-out art, majority floor), or Nones."""
    labels_train, labels_held = [iq.primary_type(c) for c in cap_train], [iq.primary_type(c) for c in cap_held]
    if None in labels_train or None in labels_held:
        return None, None, None  # captions that name no type (e.g. BLIP's): no probe
    probe = iq.TypeProbe(fe_train, labels_train)
    return probe, probe.accuracy(fe_held, labels_held), iq.majority_share(labels_train, labels_held)


def validate(C, fe):
    train, cap_train, held, cap_held = load_art(C.dataset, C.image_size, C.seed, C.val_fraction, C.eval_images)
    n = len(held)
    g = torch.Generator().manual_seed(C.seed)
    idx = torch.randperm(len(train), generator=g)[:n]  # as many training images as a run draws samples
    sub = train[idx]
    t0 = time.time()
    f_train, f_held = fe(train), fe(held)
    f_sub = f_train[idx]
    everything = torch.cat([f_train, f_held])
    halves = torch.randperm(len(everything), generator=g)
    a, b = everything[halves[: len(everything) // 2]], everything[halves[len(everything) // 2 :]]
    rows = [
        ("two halves of all the art", iq.kid(a, b), iq.frechet_distance(a, b)),
        (f"{n} training images (floor)", iq.kid(f_held, f_sub), iq.frechet_distance(f_held, f_sub)),
    ]
    for sigma in (0.5, 1.0, 2.0):
        f = fe(iq.blur(sub, sigma))
        rows.append((f"blurred by {sigma:g} px", iq.kid(f_held, f), iq.frechet_distance(f_held, f)))
    for std in (0.05, 0.1, 0.2):
        f = fe(iq.add_noise(sub, std, seed=C.seed))
        rows.append((f"noise of std {std:g}", iq.kid(f_held, f), iq.frechet_distance(f_held, f)))
    print(
        f"\n{C.dataset} at {C.image_size} px: {len(train)} training / {n} held-out images; features "
        f"{time.time() - t0:.0f} s"
    )
    print(f"\n| {n} images against the {n} held-out | KID x1000 | FD |")
    print("|---|---|---|")
    for name, (k, s), fd in rows:
        print(f"| {name} | {k:.2f} ± {s:.2f} | {fd:.1f} |")
    threshold = iq.copy_threshold(f_held, f_train)
    h1, h2 = f_held[: n // 2], f_held[n // 2 :]
    print(f"\ncopy threshold (99th percentile of held-out-to-train similarity): {threshold:.4f}")
    print(f"copy share of {n} training images presented as samples: {iq.copy_share(f_sub, f_train, threshold):.3f}")
    print(
        "copy share of held-out art, threshold from the other half: "
        f"{iq.copy_share(h2, f_train, iq.copy_threshold(h1, f_train)):.3f}"
        f" and {iq.copy_share(h1, f_train, iq.copy_threshold(h2, f_train)):.3f}"
    )
    _, ceiling, floor = probe_scores(f_train, cap_train, f_held, cap_held)
    if ceiling is not None:
        print(f"type probe: held-out real art {ceiling:.3f} (ceiling), majority type {floor:.3f} (floor)")
    return dict(
        rows={name: dict(kid=k, kid_std=s, fd=fd) for name, (k, s), fd in rows},
        threshold=threshold,
        probe_ceiling=ceiling,
        probe_floor=floor,
    )


@torch.no_grad()
def judge_checkpoint(C, fe, device):
    from checkpoints import build_model, build_scheduler, find_checkpoint, load_checkpoint
    from diffusion_model import SamplerConfig, image_generators, sample
    from text_encoders import TextEncoder, embed_prompts

    path = find_checkpoint(C.checkpoint)
    if path is None:
        raise UserError(f"no checkpoint in {C.checkpoint}: pass --checkpoint=<ckpt.pt or run folder>")
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    train, cap_train, held, cap_held = load_art(
        C.dataset, ckpt["model_args"]["image_size"], cfg["seed"], cfg["val_fraction"], cfg["eval_images"]
    )
    model = build_model(ckpt, C.weights).to(device).eval()
    scheduler = build_scheduler(ckpt).to(device)
    encoder = TextEncoder(ckpt["text_encoder"], device)
    prompts = [without_name(c) for c in cap_held] if C.drop_name else cap_held
    cond, uncond = embed_prompts(encoder, prompts, device)
    focus = None
    if C.focus_scale:
        phrases = [iq.type_phrase(c) for c in cap_held]
        if None in phrases:
            raise UserError(
                f"--focus_scale guides toward each caption's type, but {C.dataset}'s captions name none "
                f"({cap_held[phrases.index(None)]!r}): leave --focus_scale=0"
            )
        focus = embed_prompts(encoder, phrases, device)[0]
    S = SamplerConfig.from_settings(C)
    f_train, f_held = fe(train), fe(held)
    threshold = iq.copy_threshold(f_held, f_train)
    probe, ceiling, floor = probe_scores(f_train, cap_train, f_held, cap_held)
    types_held = [iq.primary_type(c) for c in cap_held]  # the probe's labels, the same for every draw
    draws, seconds = [], 0.0
    for sample_seed in range(C.sample_seed, C.sample_seed + C.draws):
        t0 = time.time()
        # the noise of training's evaluation for --sample_seed = the run's seed: the same images
        gens = image_generators(sample_seed, len(cap_held))
        samples = sample(model, scheduler, cond, uncond, S, generator=gens, focus=focus)
        seconds += time.time() - t0
        f_samples = fe(samples)
        kid, kid_std = iq.kid(f_held, f_samples)
        own, other = iq.caption_similarity(f_samples, f_held)
        draw = dict(
            sample_seed=sample_seed,
            kid=kid,
            kid_std=kid_std,
            fd=iq.frechet_distance(f_held, f_samples),
            copy_share=iq.copy_share(f_samples, f_train, threshold),
            sim_own_caption=own,
            sim_other_caption=other,
        )
        if probe is not None:
            draw["probe_samples"] = probe.accuracy(f_samples, types_held)
        draws.append(draw)
        if len(draws) == 1:
            grid = torch.cat([samples[:8].cpu(), held[:8].float() / 127.5 - 1])  # the first draw's
    res = dict(
        checkpoint=path,
        step=ckpt["step"],
        **{k: sum(d[k] for d in draws) / len(draws) for k in draws[0] if k != "sample_seed"},
        sampler=f"{S.sampler}-{S.steps}" if S.sampler != "ddpm" else "ddpm",
        guidance_scale=S.guidance_scale,
        focus_scale=S.focus_scale,
        drop_name=C.drop_name,
        sample_seconds=seconds,
    )
    if probe is not None:
        res.update(probe_ceiling=ceiling, probe_floor=floor)
    if C.draws > 1:
        res["draws"] = draws
        kids = " / ".join(f"{d['kid']:.1f}" for d in draws)
        last = C.sample_seed + C.draws - 1
        line = f"{C.draws} draws (sample seeds {C.sample_seed}..{last}): KID x1000 {res['kid']:.1f} ({kids})"
        if probe is not None:
            probes = " / ".join(f"{d['probe_samples']:.3f}" for d in draws)
            line += f", type probe {res['probe_samples']:.3f} ({probes}; half-way {(ceiling + floor) / 2:.3f})"
        print(line)
    print(json.dumps(res, indent=1))
    grid_path = C.out or os.path.join(os.path.dirname(path), f"quality_samples_{ckpt['step']:07d}.png")
    save_grid(grid, grid_path)
    with open(os.path.splitext(grid_path)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if not C.dataset:
        raise UserError("pass --dataset=<an imagefolder with metadata.jsonl>, e.g. ../shared/data/pokedex-art")
    if C.weights not in ("ema", "model"):
        raise UserError(f"--weights={C.weights}: use ema (the averaged weights) or model (the raw ones)")
    if C.draws < 1:
        raise UserError(f"--draws={C.draws}: draw at least once (1 is one sample per held-out caption)")
    if C.out and os.path.splitext(C.out)[1].lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out={C.out} is the grid image: give it a .png or .jpg name")
    if not iq.available():
        raise UserError(f"the metric's packages are missing: {iq.INSTALL_HINT}")
    device = pick_device(C.device)
    fe = iq.FeatureExtractor(device)
    return judge_checkpoint(C, fe, device) if C.checkpoint else validate(C, fe)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
