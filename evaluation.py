"""
What a run measures and where it writes it: the validation loss at fixed noise, the shapes judge's
adherence, KID and the copy share on image datasets (image_quality.py), the sample grids, the run's
log.jsonl, W&B, and the one-line banner of what is being trained.
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
from image_data import save_grid


@torch.no_grad()
def validation_loss(model, scheduler, images, ctx_table, ctx_mask, rows, batch, autocast, min_snr_gamma=0.0):
    """Mean loss over the validation images at fixed timesteps (evenly spread over [0, T)) and
    fixed noise, so that two evaluations differ only by the model."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    N, T = images.shape[0], scheduler.num_timesteps
    t_all = torch.linspace(0, T - 1, N).round().long()
    noise_all = torch.randn(images.shape, generator=g)
    total = 0.0
    for i in range(0, N, batch):
        x0 = images[i : i + batch].to(ctx_table.device).float() / 127.5 - 1
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


def evaluate(C, M, D, S, step, sysinfo, lr_now, loss_ema, imgs_per_s):
    """Validation loss; on shapes the judge's adherence with and without guidance; on image
    datasets KID against the held-out art and the copy share (image_quality.py), all drawn with the
    sampler S (a SamplerConfig): (log, line)."""
    log = {
        "val/loss": validation_loss(
            M.model,
            M.scheduler,
            D.val_images,
            D.ctx_table,
            D.ctx_mask,
            D.val_rows,
            2 * C.batch_size,
            sysinfo.autocast,
            C.min_snr_gamma,
        )
    }
    train_loss = loss_ema or float("nan")
    line = f"step {step}: val loss {log['val/loss']:.4f}, train loss {train_loss:.4f}, lr {lr_now:.2e}, "
    line += f"{imgs_per_s:.0f} img/s"
    if D.judge_prompts is not None:
        w = S.guidance_scale
        adh = shapes.sample_adherence(
            M.ema, M.scheduler, D.judge_prompts, *D.judge_ctx, S, (0.0, w), C.seed, sysinfo.autocast
        )
        for scale, splits in adh.items():
            for split, attrs in splits.items():
                log.update({f"adherence/w{scale:g}/{split}/{a}": v for a, v in attrs.items()})
        line += f" | adherence seen (w=0 -> w={w:g}): " + " ".join(
            f"{a} {adh[0.0]['seen'][a]:.2f}->{adh[w]['seen'][a]:.2f}" for a in ("color", "shape", "position", "size")
        )
        line += " | held-out color {:.2f}->{:.2f}".format(adh[0.0]["held_out"]["color"], adh[w]["held_out"]["color"])
    if D.real_art is not None:  # one EMA sample per held-out caption, judged against the held-out art
        t0 = time.time()
        r = D.val_rows.to(D.ctx_table.device)
        with sysinfo.autocast:
            cond, uncond = (D.ctx_table[r], D.ctx_mask[r]), (D.ctx_table[:1], D.ctx_mask[:1])
            images = sample(M.ema, M.scheduler, cond, uncond, S, generator=image_generators(C.seed, len(r)))
        log.update({f"quality/{k}": v for k, v in D.real_art.score(images).items()})
        log["quality/seconds"] = time.time() - t0
        line += " | KID {:.2f} +- {:.2f}, copies {:.2f}".format(
            log["quality/kid"], log["quality/kid_std"], log["quality/copy_share"]
        )
    return log, line


def load_real_art(C, D, sysinfo):
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
    if len(D.val_images) < 2:
        print(
            f"real-image evaluation is off: KID needs 2 or more held-out images, not {len(D.val_images)} "
            f"(raise --val_fraction)",
            file=sys.stderr,
        )
        return None
    return image_quality.RealArt(image_quality.FeatureExtractor(sysinfo.device), D.val_images, D.train_images)


def save_samples(C, M, D, S, step, sysinfo, run_dir, wandb_run):
    """The run's sample grid of this step: the EMA model with the sampler S on the fixed prompts and seed."""
    with sysinfo.autocast:
        gens = image_generators(C.seed, len(D.sample_prompts))
        grid = sample(M.ema, M.scheduler, D.sample_cond, D.sample_uncond, S, generator=gens)
    grid_path = os.path.join(run_dir, f"samples_{step:07d}.png")
    save_grid(grid, grid_path)
    if wandb_run:
        import wandb

        wandb_run.log({"samples": wandb.Image(grid_path, caption=" | ".join(D.sample_prompts))}, step=step)


def run_banner(C, D, M, run_dir, sysinfo):
    """The one line that says what this run trains, on what, where."""
    n_params = sum(p.numel() for p in M.model.parameters())
    parts = [
        f"run {run_dir}",
        f"{D.name}: {len(D.train_images)} train / {len(D.val_images)} val images at {C.image_size}px",
        f"text {C.text_encoder} ({D.context_dim}-d, {len(D.ctx_table)} distinct captions)",
        f"U-Net {n_params / 1e6:.1f}M params, predicts {C.prediction_type}",
        str(sysinfo.device),
    ]
    if sysinfo.ddp:
        parts.append(f"distributed: {sysinfo.world} ranks, global batch {C.batch_size * sysinfo.world}")
    return " | ".join(parts)


def write_log(run_dir, step, metrics):
    """Append one JSON line to the run's log.jsonl: the same numbers as W&B, readable offline."""
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


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
