"""
What a run measures and where it writes it: the Evaluator (the validation loss at fixed noise, the
shapes judge's adherence, KID and the copy share on image datasets, image_quality.py), the sample
grids, the run's log.jsonl, W&B, and the one-line banner of what is being trained.
"""

import contextlib
import json
import os
import sys
import time

import torch

import image_quality
import shapes
from diffusion_model import diffusion_loss, image_generators, sample
from image_data import save_grid, to_model_range


@torch.no_grad()
def validation_loss(
    model, scheduler, images, ctx_table, ctx_mask, rows, t_all, noise_all, batch, autocast, min_snr_gamma
):
    """Mean loss over the validation images at the given timesteps and noise, one per image."""
    model.eval()
    N = images.shape[0]
    total = 0.0
    for i in range(0, N, batch):
        x0 = to_model_range(images[i : i + batch].to(ctx_table.device))
        r = rows[i : i + batch].to(ctx_table.device)
        with autocast:
            loss = diffusion_loss(
                model,
                scheduler,
                x0,
                ctx_table[r],
                ctx_mask[r],
                t_all[i : i + batch].to(x0.device),
                noise_all[i : i + batch].to(x0.device),
                min_snr_gamma,
            )
        total += loss.item() * x0.shape[0]
    model.train()
    return total / N


class Evaluator:
    """What a run measures, built once before the loop: the validation loss at fixed timesteps (evenly
    spread over [0, T)) and fixed noise, so that two evaluations differ only by the model; on shapes
    the judge's adherence with and without guidance; on image datasets KID against the held-out art
    and the copy share (image_quality.py, whose real side is computed here once). Samples are drawn
    with the sampler `sampler` (a SamplerConfig). Calling it returns the figures of the model now."""

    def __init__(self, C, data, sampler, sysinfo):
        self.data, self.sampler, self.sysinfo = data, sampler, sysinfo
        self.seed, self.min_snr_gamma, self.batch = C.seed, C.min_snr_gamma, 2 * C.batch_size
        N, T = data.val_images.shape[0], C.num_timesteps
        g = torch.Generator().manual_seed(1234)
        self.val_t = torch.linspace(0, T - 1, N).round().long()  # (N,)
        self.val_noise = torch.randn(data.val_images.shape, generator=g)  # (N, 3, S, S)
        self.real_art = load_real_art(C, data, sysinfo)

    def __call__(self, state):
        """{name: figure} of the training state `state` (its model, EMA and noise scheduler)."""
        t0 = time.time()
        data, S, autocast = self.data, self.sampler, self.sysinfo.autocast
        figures = {
            "val/loss": validation_loss(
                state.model,
                state.scheduler,
                data.val_images,
                data.ctx_table,
                data.ctx_mask,
                data.val_rows,
                self.val_t,
                self.val_noise,
                self.batch,
                autocast,
                self.min_snr_gamma,
            )
        }
        # shapes: one shape (color, shape, size, position) and, with scenes, two objects (count, binding, position)
        judged = (("adherence", data.judge_prompts, data.judge_cond), ("scenes", data.scene_prompts, data.scene_cond))
        for name, prompts, conds in judged:
            if prompts is None:
                continue
            scales = (0.0, S.guidance_scale)
            res = shapes.sample_adherence(state.ema, state.scheduler, prompts, *conds, S, scales, self.seed, autocast)
            for scale, splits in res.items():
                for split, attrs in splits.items():
                    figures.update({f"{name}/w{scale:g}/{split}/{a}": v for a, v in attrs.items()})
        if self.real_art is not None:  # one EMA sample per held-out caption, judged against the held-out art
            t_quality = time.time()
            r = data.val_rows.to(data.ctx_table.device)
            with autocast:
                cond, uncond = (data.ctx_table[r], data.ctx_mask[r]), (data.ctx_table[:1], data.ctx_mask[:1])
                images = sample(
                    state.ema, state.scheduler, cond, uncond, S, generator=image_generators(self.seed, len(r))
                )
            figures.update({f"quality/{k}": v for k, v in self.real_art.score(images).items()})
            figures["quality/seconds"] = time.time() - t_quality
        figures["eval/seconds"] = time.time() - t0  # so that evaluation's share of the run's minutes stays visible
        return figures


def figures_line(figures, guidance_scale):
    """The evaluation's figures beyond the validation loss, as the loop's progress line ends."""
    line, w = "", guidance_scale
    if f"adherence/w{w:g}/seen/color" in figures:
        seen = lambda scale, a: figures[f"adherence/w{scale:g}/seen/{a}"]
        line += f" | adherence seen (w=0 -> w={w:g}): " + " ".join(
            f"{a} {seen(0.0, a):.2f}->{seen(w, a):.2f}" for a in ("color", "shape", "position", "size")
        )
        held = lambda scale: figures[f"adherence/w{scale:g}/held_out/color"]
        line += " | held-out color {:.2f}->{:.2f}".format(held(0.0), held(w))
    if f"scenes/w{w:g}/held_out/binding" in figures:
        scene = lambda a: "{:.2f}/{:.2f}".format(*(figures[f"scenes/w{w:g}/{s}/{a}"] for s in ("seen", "held_out")))
        line += f" | two objects (w={w:g}, seen/never-seen pairings): " + " ".join(
            f"{a} {scene(a)}" for a in ("count", "binding", "position")
        )
    if "quality/kid" in figures:
        line += " | KID {:.2f} +- {:.2f}, copies {:.2f}".format(
            figures["quality/kid"], figures["quality/kid_std"], figures["quality/copy_share"]
        )
    return line


def load_real_art(C, data, sysinfo):
    """The real side of the quality evaluation (image datasets, rank 0): features of the held-out
    and the training art, computed once. Without the metric's packages training goes on without it."""
    if C.dataset == "shapes" or not sysinfo.master:
        return None
    if not image_quality.available():
        print(
            f"real-image evaluation is off (KID, copy check): {image_quality.INSTALL_HINT} to turn it on",
            file=sys.stderr,
        )
        return None
    if len(data.val_images) < 2:
        print(
            f"real-image evaluation is off: KID needs 2 or more held-out images, not {len(data.val_images)} "
            f"(raise --val_fraction)",
            file=sys.stderr,
        )
        return None
    return image_quality.RealArt(image_quality.FeatureExtractor(sysinfo.device), data.val_images, data.train_images)


def save_samples(C, state, data, S, step, sysinfo, run_dir, wandb_run):
    """The run's sample grid of this step: the EMA model with the sampler S on the fixed prompts and seed."""
    with sysinfo.autocast:
        gens = image_generators(C.seed, len(data.sample_prompts))
        grid = sample(state.ema, state.scheduler, data.sample_cond, data.sample_uncond, S, generator=gens)
    grid_path = os.path.join(run_dir, f"samples_{step:07d}.png")
    save_grid(grid, grid_path)
    if wandb_run:
        import wandb

        wandb_run.log({"samples": wandb.Image(grid_path, caption=" | ".join(data.sample_prompts))}, step=step)


def run_banner(C, data, state, run_dir, sysinfo):
    """The one line that says what this run trains, on what, where."""
    n_params = sum(p.numel() for p in state.model.parameters())
    parts = [
        f"run {run_dir}",
        f"{data.name}: {len(data.train_images)} train / {len(data.val_images)} val images at {C.image_size}px",
        f"text {C.text_encoder} ({data.context_dim}-d, {len(data.ctx_table)} distinct captions)",
        f"U-Net {n_params / 1e6:.1f}M params, predicts {C.prediction_type}",
        f"{sysinfo.device}, {sysinfo.precision_label}",
    ]
    if sysinfo.ddp:
        parts.append(f"distributed: {sysinfo.world} ranks, global batch {C.batch_size * sysinfo.world}")
    return " | ".join(parts)


def write_log(run_dir, step, metrics, wandb_run=None):
    """Append one JSON line to the run's log.jsonl, and log the same numbers to W&B if it runs."""
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if wandb_run:
        wandb_run.log(metrics, step=step)


def start_wandb(C, run_dir, wandb_id):
    """W&B is imported only when enabled. auto: online when logged in, else offline (a local run
    in the run folder that `wandb sync` uploads later)."""
    mode = C.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        logged_in = bool(os.environ.get("WANDB_API_KEY"))
        if not logged_in:
            import netrc

            with contextlib.suppress(Exception):
                logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        mode = "online" if logged_in else "offline"
    import wandb

    return wandb.init(
        project=C.wandb_project,
        name=os.path.basename(run_dir),
        dir=run_dir,
        config=vars(C),
        mode=mode,
        id=wandb_id,
        resume="allow" if wandb_id else None,
    )
