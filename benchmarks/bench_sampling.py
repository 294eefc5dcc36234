"""
Sampling speed against quality on a `shapes` checkpoint: seconds per image and judged adherence for
DDPM over all 1000 steps and DDIM with 50, 25 and 10 steps (deterministic, eta = 0, and stochastic,
eta = 1), each without (w = 1) and with classifier-free guidance (w = --guidance).

    python -m benchmarks.bench_sampling                                   # latest run in diffusion_results
    python -m benchmarks.bench_sampling --checkpoint=diffusion_results/<run> --guidance=3 --repeats=3
    python -m benchmarks.bench_sampling --samplers=ddim25,ddim10 --etas=0  # any of ddpm, ddim<steps>

Each (sampler, guidance) samples all 27 prompts of shapes.eval_prompts() as one batch, `repeats`
times with seeds seed, seed+1, ..., through benchmarks/adherence.py's score(), which also judges the
images; s/image is its wall time (sampling plus the judge) over the images drawn, after a short
warm-up. The table shows adherence on the seen color x shape pairs (15 prompts a repeat, so one
image moves a number by 0.067: use --repeats=3 or more before reading differences of 0.02).
A forward hook on the U-Net counts its calls: with guidance each step is still one forward, over a
doubled batch (conditional + unconditional captions). Sampling runs in fp32, as in adherence.py.

Keys (--key=value): checkpoint (ckpt.pt, run folder or out_dir), guidance, repeats, seed, samplers,
etas (DDIM's eta values, comma-separated), device (auto|cpu|cuda), use_ema.
"""

import sys

import shapes
from benchmarks.adherence import load_shapes_checkpoint, score
from configurator import UserError, parse_config, pick_device, run_cli
from text_encoders import TextEncoder

DEFAULTS = dict(
    checkpoint="diffusion_results",
    guidance=3.0,
    repeats=1,
    seed=0,
    samplers="ddpm,ddim50,ddim25,ddim10",
    etas="0,1",
    device="auto",
    use_ema=True,
)
ATTRS = ("color", "shape", "position", "size")


def parse_samplers(text, num_timesteps, etas=(0.0,)):
    """ "ddpm,ddim50" with etas (0, 1) -> [("ddpm", T, 1.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0)]
    (DDPM's eta is 1 by construction)."""
    samplers = []
    for name in text.split(","):
        name = name.strip()
        if name == "ddpm":
            samplers.append(("ddpm", num_timesteps, 1.0))
        elif name.startswith("ddim") and name[4:].isdigit() and 1 <= int(name[4:]) <= num_timesteps:
            samplers.extend(("ddim", int(name[4:]), eta) for eta in etas)
        else:
            raise UserError(
                f"--samplers: cannot read {name!r}: use ddpm or ddim<steps> with 1 <= steps <= {num_timesteps}, "
                f"e.g. ddpm,ddim50,ddim25"
            )
    return samplers


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.repeats < 1:
        raise UserError("--repeats must be >= 1")
    device = pick_device(C.device)
    path, ckpt, model, scheduler = load_shapes_checkpoint(C.checkpoint, C.use_ema, device)
    try:
        etas = [float(e) for e in C.etas.split(",")]
    except ValueError:
        raise UserError(f"--etas={C.etas}: give numbers separated by commas, e.g. 0,1") from None
    if any(e < 0 for e in etas):
        raise UserError(f"--etas={C.etas}: eta must be >= 0")
    samplers = parse_samplers(C.samplers, ckpt["num_timesteps"], etas)
    encoder = TextEncoder(ckpt["text_encoder"])
    guidances = [1.0] if C.guidance == 1.0 else [1.0, C.guidance]
    n_prompts = len(shapes.eval_prompts())
    n_seen = sum(not p["held_out"] for p in shapes.eval_prompts())

    forward_batches = []  # the batch size of every U-Net call
    model.register_forward_hook(lambda module, inputs, output: forward_batches.append(inputs[0].shape[0]))
    score(model, scheduler, encoder, [C.guidance], "ddim", 2, C.seed, 1)  # warm-up, not reported

    print(
        f"checkpoint {path} (step {ckpt['step']}, {ckpt['model_args']['image_size']}px) on {device}, "
        f"{C.repeats} repeat(s), seed {C.seed}"
    )
    rows = []
    for sampler, steps, eta in samplers:
        for w in guidances:
            forward_batches.clear()
            res, seconds_per_image = score(model, scheduler, encoder, [w], sampler, steps, C.seed, C.repeats, eta)
            forwards_per_step = len(forward_batches) / (steps * C.repeats)
            rows.append(
                dict(
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    w=w,
                    spi=seconds_per_image,
                    fps=forwards_per_step,
                    batch=sorted(set(forward_batches)),
                    seen=res[w]["seen"],
                    held_out=res[w]["held_out"],
                )
            )
            print(
                f"{sampler}-{steps} eta={eta:g} w={w:g}: {seconds_per_image:.4f} s/image, "
                f"{forwards_per_step:g} forwards/step "
                f"(batch {rows[-1]['batch']}), seen " + " ".join(f"{a} {res[w]['seen'][a]:.2f}" for a in ATTRS),
                flush=True,
            )

    print(f"\n| sampler | steps | eta | guidance | s/image | forwards/step | {' | '.join(ATTRS)} |")
    print("|---|---|---|---|---|---|" + "---|" * len(ATTRS))
    for r in rows:
        print(
            f"| {r['sampler']} | {r['steps']} | {r['eta']:g} | {r['w']:g} | {r['spi']:.4f} | {r['fps']:g} | "
            + " | ".join(f"{r['seen'][a]:.2f}" for a in ATTRS)
            + " |"
        )
    print("(adherence on the seen color x shape pairs; forwards/step counts U-Net calls per sampling step)")
    for w in guidances:
        batches = sorted({b for r in rows if r["w"] == w for b in r["batch"]})
        print(
            f"w={w:g}: every U-Net call carries {batches} images "
            + (
                f"(the {n_prompts} prompts, conditional only)"
                if w == 1.0
                else f"({n_prompts} conditional + {n_prompts} unconditional: CFG doubles the batch, not the calls)"
            )
        )

    by_key = {(r["sampler"], r["steps"], r["eta"], r["w"]): r for r in rows}
    T = ckpt["num_timesteps"]
    for w, eta in ((w, eta) for w in guidances for eta in etas):
        ddpm, ddim25 = by_key.get(("ddpm", T, 1.0, w)), by_key.get(("ddim", 25, eta, w))
        if ddpm is None or ddim25 is None:
            continue
        diffs = {a: ddim25["seen"][a] - ddpm["seen"][a] for a in ATTRS}
        worst = max(abs(d) for d in diffs.values())
        print(
            f"DDIM-25 (eta={eta:g}) vs DDPM-{T} at w={w:g}: adherence differences (DDIM - DDPM, seen) "
            + ", ".join(f"{a} {d:+.2f}" for a, d in diffs.items())
            + f"; largest {worst:.2f} -> {'within' if worst <= 0.02 + 1e-9 else 'NOT within'} 0.02 "
            f"(resolution {1 / (n_seen * C.repeats):.3f}: one image of {n_seen} seen prompts x {C.repeats} repeat(s)); "
            f"DDIM-25 is {ddpm['spi'] / ddim25['spi']:.1f}x faster"
        )
    return rows


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
