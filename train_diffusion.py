"""
Train the text-conditioned diffusion model of diffusion_model.py.

    python train_diffusion.py                          # no GPU: the CPU shapes recipe; a GPU: the GPU recipe
    python train_diffusion.py config/shapes_cpu.py --max_steps=1000  # a config file, then globals as --key=value
    python train_diffusion.py --resume=auto            # continue the latest run in out_dir, with its own settings
    torchrun --nproc_per_node=4 train_diffusion.py     # the same script on 4 GPUs (DDP)

Each run lives in its own folder under out_dir: checkpoints (ckpt.pt), sample grids, the W&B run.
The file reads top to bottom: the settings, the setup of a run (resume, `auto`, model) in named
functions, then `main`, `setup`, `train` (the one training loop, in one screen) and `finish`. Its
helpers live in modules named for them: distributed.py (device, ranks, stop signals), checkpoints.py
(checkpoints, the run folder and its lock), image_data.py (the data, get_batch), evaluation.py (the
Evaluator, sample grids, logging).
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from checkpoints import (
    CKPT_NAME,
    check_checkpoint,
    check_output_dir,
    checkpoint_state,
    find_checkpoint,
    load_checkpoint,
    lock_run,
    new_run_dir,
    release_lock,
    save_checkpoint,
)
from configurator import (
    DEVICES,
    UserError,
    check_ranges,
    collect_settings,
    hub_reachable,
    is_config_file,
    offline_banner,
    parse_config,
    pick_device,
    read_config_file,
    run_cli,
)
from diffusion_model import SAMPLERS, NoiseScheduler, SamplerConfig, UNet, UNetConfig, diffusion_loss
from distributed import (
    all_mean,
    any_rank,
    check_replicas_identical,
    fail_together,
    from_rank0,
    install_stop_handlers,
    restore_rng,
    setup_device,
    stop_requested,
)
from evaluation import Evaluator, figures_line, run_banner, save_samples, start_wandb, write_log
from image_data import get_batch, load_data
from text_encoders import resolve_text_encoder

# -----------------------------------------------------------------------------
# config: every global below can be set in a config file or overridden as --key=value.
# These defaults are the GPU recipe's model and schedule (config/pokemon_gpu.py adds its dataset, text encoder and
# held-out share); without a GPU and without a config file, config/shapes_cpu.py is read first (a banner says so).
_before_settings = set(globals())
# data
# auto (Pokémon if the Hub answers, else shapes) | pokemon | shapes | a Hub dataset id | a local imagefolder
dataset = "auto"
image_column = "image"  # column names for Hub datasets and folders
caption_column = "text"
image_size = 0  # 0: the dataset's default (32 for shapes, 64 otherwise)
shapes_num_images = 20000  # how many images the built-in shapes dataset draws
# shapes' wordings: varied (templates and synonyms: a user's own wording still works) | six (six fixed templates)
shapes_captions = "varied"
# share of the shapes images that are scenes of two shapes in two corners (shapes.make_scenes); the evaluation then
# also judges two-object prompts, seen and never-seen pairings (count, binding, position)
shapes_scenes = 0.0
val_fraction = 0.05  # share of the images held out for the validation loss (fixed seed)
text_encoder = "auto"  # auto (CLIP if the Hub answers, else minilm) | minilm | a CLIP model id | a local model folder
# model (the U-Net's UNetConfig; context_dim comes from the text encoder)
base_channels = 128
channel_mults = (1, 2, 2, 4)
num_res_blocks = 2
attention_levels = (1, 2, 3)
n_heads = 4
dropout = 0.1
# fixed 2D sin-cos positions on every SpatialTransformer's image tokens: attention alone cannot tell where a token is
pos_embed = True
coord_conv = False  # (x, y) coordinate channels into conv_in (CoordConv)
# > 1: the U-Net works on p x p cells of pixels, about p^2 times cheaper a step; loss and samples stay at full size
patch_size = 1
# > 0: Transformer layers over the caption's tokens, trained with the U-Net, before cross-attention reads them
text_layers = 0
num_timesteps = 1000
prediction_type = "v"  # what the U-Net predicts: v (the velocity, Salimans & Ho) | eps (the noise, Ho et al.)
# training
batch_size = 64  # per process: under torchrun the global batch is batch_size * number of GPUs
max_steps = 30000
# > 0: a time budget for the training loop in minutes, evaluations included (not the data loading before it). The run
# times its steps BUDGET_STEPS and its first evaluation, then sets max_steps to what fits (printed, and stored in the
# checkpoint, so resume and DDP stay exact)
max_minutes = 0.0
lr = 2e-4  # peak learning rate, after linear warmup, then cosine decay to min_lr at max_steps
min_lr = 2e-5
warmup_steps = 500
weight_decay = 0.0
min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0: the plain loss
# training timesteps: 1 uniform, > 1 shifted toward noise (image_data.shifted_timesteps), < 1 toward the clean end
t_shift = 1.0
grad_clip = 1.0
p_uncond = 0.1  # share of captions replaced by the empty caption, for classifier-free guidance
# share of training captions shortened to a random subset of their parts (image_data.caption_parts cuts after ,.;:!?)
# so that the words many captions share (a type, a color) must carry the image, not the name that fits only one
caption_parts = 0.0
# how a caption is shortened: random (each part kept with p 1/2) | first (the first part, pokedex-art's name, dropped)
caption_cut = "random"
flips = True  # random horizontal flips, of the images whose caption names no side (image_data.mirrorable)
ema_decay = 0.999  # EMA of the weights, warmed up as min(ema_decay, (1 + k) / (10 + k))
# evaluation, samples, checkpoints, logging
eval_interval = 500  # validation loss (and shapes adherence) every this many steps
eval_images = 256  # validation images per evaluation (fixed timesteps and noise)
sample_interval = 1000  # a grid of samples (EMA, CFG, fixed prompts and seed)
# the sampler of the evaluations and the grids (diffusion_model.SamplerConfig; sample_diffusion.py has the same names)
# ddpm (all T steps) | ddim | dpmpp_2m (DPM-Solver++(2M)), both with `steps` steps; DPM-Solver++ at 8 steps matched
# DDIM-50 and DDPM-1000 on both CPU recipes (docs/results.md, "Samplers")
sampler = "dpmpp_2m"
steps = 8  # the sampler's steps, 1..num_timesteps (ddim, dpmpp_2m)
eta = 0.0  # DDIM's noise: 0 deterministic, 1 stochastic like DDPM (ddim only)
guidance_scale = 3.0  # classifier-free guidance w
# guidance only at noise levels t >= this; below, the conditional model (guiding the nearly clean steps bends unseen
# pairs into seen ones)
guidance_t_min = 300
ckpt_interval = 1000
log_interval = 10
out_dir = "diffusion_results"
resume = ""  # "" (new run) | auto (latest run in out_dir) | a checkpoint file or run folder
wandb_mode = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
wandb_project = "text-diffusion"
# system
device = "auto"  # auto (CUDA, else Apple's mps, else the CPU) | cuda | mps | cpu
# the matmuls' and convolutions' precision: auto (bf16 autocast on CUDA and on CPUs whose bf16 matmuls measure >= 3x
# their fp32 ones at start, e.g. AMX; else fp32) | bf16 | fp32
dtype = "auto"
compile = False  # torch.compile the U-Net for training
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = collect_settings(globals(), _before_settings)
# The valid values of the settings (configurator.py reads the notation): checked before any work.
# A setting without one is type-checked only; tests/test_config.py insists every shipped one has one.
RANGES = dict(
    dataset="nonempty",
    image_column="nonempty",
    caption_column="nonempty",
    image_size="[0, 1024]",
    shapes_num_images="[1, 1000000]",
    shapes_captions=("varied", "six"),
    shapes_scenes="[0, 1]",
    val_fraction="[0, 0.5]",
    text_encoder="nonempty",
    base_channels="[32, 1024]",
    channel_mults="1+ of [1, 16]",
    num_res_blocks="[1, 16]",
    attention_levels="0+ of [0, 15]",
    n_heads="[1, 64]",
    dropout="[0, 1)",
    pos_embed="bool",
    coord_conv="bool",
    patch_size="[1, 16]",
    text_layers="[0, 16]",
    num_timesteps="[2, 100000]",
    prediction_type=("v", "eps"),
    batch_size="[1, 65536]",
    max_steps="[1, 1e9]",
    max_minutes="[0, 1e7]",
    lr="(0, 1]",
    min_lr="[0, 1]",
    warmup_steps="[0, 1e9]",
    weight_decay="[0, 10]",
    min_snr_gamma="[0, 1e4]",
    t_shift="(0, 100]",
    grad_clip="(0, 1e6]",
    p_uncond="[0, 1)",
    caption_parts="[0, 1]",
    caption_cut=("random", "first"),
    flips="bool",
    ema_decay="[0, 1)",
    eval_interval="[1, 1e9]",
    eval_images="[1, 100000]",
    sample_interval="[1, 1e9]",
    sampler=tuple(SAMPLERS),
    steps="[1, 100000]",
    eta="[0, 1]",
    guidance_scale="[0, 100]",
    guidance_t_min="[0, 100000]",
    ckpt_interval="[1, 1e9]",
    log_interval="[1, 1e9]",
    out_dir="nonempty",
    resume="text",
    wandb_mode=("auto", "online", "offline", "disabled"),
    wandb_project="nonempty",
    device=DEVICES,
    dtype=("auto", "bf16", "fp32"),
    compile="bool",
    seed="[0, 2147483647]",
)
# the U-Net's settings: UNetConfig's fields but those that come from the data and the text encoder
MODEL_KEYS = tuple(
    f.name for f in dataclasses.fields(UNetConfig) if f.name not in ("image_size", "in_channels", "context_dim")
)
# keys a resumed run must keep: changing them mid-run would train another model on other data (val_fraction and
# eval_images split the images: another value would move trained-on images into validation)
RUN_KEYS = MODEL_KEYS + ("dataset", "image_column", "caption_column", "image_size", "shapes_num_images")
RUN_KEYS += (
    "shapes_captions",
    "shapes_scenes",
    "val_fraction",
    "eval_images",
    "text_encoder",
    "num_timesteps",
    "prediction_type",
)
RUN_KEYS += ("seed",)
# keys that describe this invocation, not the run: never taken from a checkpoint
# this invocation's, never the checkpoint's: where it runs (the machine decides device and dtype), where it writes
SESSION_KEYS = ("resume", "out_dir", "device", "dtype")
CPU_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "shapes_cpu.py")


# -----------------------------------------------------------------------------
# Settings: recipe, config files, overrides, ranges


def configure(argv):
    """(C, explicit): every setting, and the keys that a config file or the command line set.
    Without a config file on a machine without a GPU, the CPU recipe is the base."""
    gave_file = any(is_config_file(a) for a in argv)
    C, explicit = parse_config(argv, DEFAULTS, RANGES)
    kind = pick_device(C.device).type
    cpu_recipe = not gave_file and kind != "cuda"  # Apple's GPU (mps) trains the CPU recipe too
    if cpu_recipe:
        recipe = read_config_file(CPU_RECIPE, DEFAULTS)
        for k, v in recipe.items():
            if k not in explicit:
                setattr(C, k, v)
    if not C.resume:  # a resumed run is checked once its own settings are back (resume_run)
        check_consistency(C)  # before the banner: settings that do not fit together are the only line printed
    warn_unused_sampler_settings(SamplerConfig.from_settings(C), explicit)
    if cpu_recipe and not C.resume:  # a resumed run takes its own settings back instead
        print(
            f"{'no GPU' if kind == 'cpu' else 'no CUDA GPU'} and no config file: training the CPU recipe "
            f"({os.path.relpath(CPU_RECIPE)}; its minutes: README, Results); "
            f"pass a config file, e.g. config/pokemon_gpu.py, to choose another",
            file=sys.stderr,
        )
    return C, explicit


def check_consistency(C):
    """Pairs of settings that are each in range but do not fit together; the U-Net's own layout
    checks (image size against levels, heads against channels) run in unet_config."""
    if C.min_lr > C.lr:
        raise UserError(
            f"--min_lr={C.min_lr} is above --lr={C.lr}: the cosine decays from lr down to min_lr; "
            f"pass a --min_lr at or below --lr"
        )
    if C.steps > C.num_timesteps:
        raise UserError(f"--steps={C.steps} is more than --num_timesteps={C.num_timesteps}: use at most that many")
    if any(level >= len(C.channel_mults) for level in C.attention_levels):
        raise UserError(
            f"--attention_levels={','.join(map(str, C.attention_levels))}: levels are 0..{len(C.channel_mults) - 1} "
            f"for --channel_mults={','.join(map(str, C.channel_mults))}"
        )
    unet_config(C)


def warn_unused_sampler_settings(sampler, explicit):
    """A sampler setting that was given but that the chosen sampler ignores gets one line, before any work."""
    for key, why in sampler.unused().items():
        if key in explicit:
            print(f"warning: --{key} has no effect: {why}", file=sys.stderr)


def unet_config(C, context_dim=1):  # context_dim 1: before the encoder is loaded, only the layout is checked
    """The U-Net layout that config C asks for. UNetConfig checks it (an image_size the levels cannot
    halve, heads that do not divide the channels, ...); from the command line that is one line to fix."""
    size = C.image_size or (32 if C.dataset == "shapes" else 64)
    try:
        return UNetConfig(image_size=size, context_dim=context_dim, **{k: getattr(C, k) for k in MODEL_KEYS})
    except ValueError as e:
        raise UserError(
            f"{e} (--image_size, --patch_size, --base_channels, --channel_mults, --attention_levels, --n_heads)"
        ) from None


# -----------------------------------------------------------------------------
# Resume: find and lock the run, then its own settings come back from its checkpoint


def resume_run(C, explicit, sysinfo):
    """Load the checkpoint to resume (or None), and set C to the run's stored settings except
    those given explicitly (merge_settings). Returns (ckpt, run_dir, lock); on an error the lock is released."""
    if not C.resume:
        return None, None, None
    path, lock = find_run(C, sysinfo)
    try:
        ckpt = None
        if path is not None:
            ckpt = load_checkpoint(path, check_weights=False)  # the weights once the layout is compared (check_layout)
            missing = [k for k in ("ema", "optimizer", "rng", "config") if k not in ckpt]
            if missing:
                raise UserError(
                    f"{path} holds no {', '.join(missing)}: it cannot be resumed exactly; sample from it with "
                    f"sample_diffusion.py, or start a new run (drop --resume)"
                )
            settings, changes = merge_settings(ckpt["config"], vars(C), explicit, path)
            if sysinfo.master:
                for k, given, stored in changes:
                    print(f"resuming with {k} {given} instead of {stored}")
            vars(C).update(settings)
            check_ranges(vars(C), RANGES)  # a checkpoint's settings are checked like the command line's
        check_consistency(C)  # a resumed run's, or a new run's when resume=auto found none (configure skipped it)
        if ckpt is None:
            return None, None, None
        check_layout(C, ckpt["model_args"], path)
        check_checkpoint(ckpt, path)
        return ckpt, os.path.dirname(os.path.abspath(path)), lock
    except BaseException:
        release_lock(lock)
        raise


def find_run(C, sysinfo):
    """(checkpoint path, lock) of the run --resume names, or (None, None) for resume=auto in an out_dir
    without runs. Rank 0 finds the checkpoint and locks its run before it is read, so that a process
    that saves and exits meanwhile has its last checkpoint read, not the one before; every rank
    then resumes that one."""
    lock = None
    try:
        path = find_checkpoint(C.out_dir if C.resume == "auto" else C.resume) if sysinfo.master else None
        if path is not None:
            lock = lock_run(os.path.dirname(os.path.abspath(path)))
        path = from_rank0(sysinfo, path)
        if path is None:
            if C.resume != "auto":
                raise UserError(f"--resume={C.resume}: no checkpoint there (pass a ckpt.pt, a run folder, or auto)")
            if sysinfo.master:
                print(f"resume=auto: no run in {C.out_dir} yet, starting a new one")
        return path, lock
    except BaseException:
        release_lock(lock)
        raise


def merge_settings(stored, given, explicit, path):
    """(settings, changes): the run's stored settings, except this invocation's (SESSION_KEYS) and
    those given explicitly. Identity keys (RUN_KEYS) must not change; other explicit changes are
    allowed and come back as (key, given, stored) for the caller to print. Touches nothing."""
    lacking = [k for k in DEFAULTS if k not in stored and k not in SESSION_KEYS]  # those come from this invocation
    if lacking:
        raise UserError(
            f"{path} was written by another version of train_diffusion.py (its settings lack "
            f"{', '.join(lacking)}): start a new run (drop --resume)"
        )
    settings, changes = dict(given), []
    for k in DEFAULTS:
        if k in SESSION_KEYS:
            continue
        if k in explicit and given[k] != stored[k]:
            if k in RUN_KEYS:
                raise UserError(
                    f"--{k}={given[k]} differs from the resumed run's {stored[k]}: drop it or start a new run"
                )
            changes.append((k, given[k], stored[k]))
            continue
        settings[k] = stored[k]
    if stored["max_minutes"] and settings["max_minutes"] == stored["max_minutes"]:
        # the run's time budget fixed its max_steps: the same budget again (a recipe file names its max_steps too)
        # keeps that end; a new end is --max_minutes=0 with --max_steps
        settings["max_steps"] = stored["max_steps"]
        changes = [c for c in changes if c[0] != "max_steps"]
    return settings, changes


def check_layout(C, model_args, path):
    """The U-Net that the run's settings describe must be the one whose weights the checkpoint
    holds: pos_embed adds no weights, so a mismatch there would load silently as another model."""
    for k in MODEL_KEYS:
        saved, mine = model_args[k], getattr(C, k)
        if (tuple(saved) if isinstance(saved, list) else saved) != mine:
            raise UserError(
                f"{path}: its weights are a U-Net with {k}={saved} but its settings say {mine}: the checkpoint "
                f"was edited or written by another version; start a new run (drop --resume)"
            )


# -----------------------------------------------------------------------------
# `auto` dataset and text encoder: decided once, for every rank


def resolve_auto(C, sysinfo):
    """Decide `auto` dataset and text encoder (rank 0 asks the Hub, every rank takes its answer),
    the dataset's default image size, and store a local encoder folder as an absolute path."""
    hub_ok = None
    if C.dataset == "auto" or C.text_encoder == "auto":
        hub_ok = from_rank0(sysinfo, hub_reachable() if sysinfo.master else None)
    if C.dataset == "auto":
        C.dataset = "pokemon" if hub_ok else "shapes"
        if not hub_ok and sysinfo.master:
            offline_banner("the built-in shapes dataset (dataset=shapes)")
    C.text_encoder = resolve_text_encoder(C.text_encoder, hub_ok, banner=sysinfo.master)
    if os.path.isdir(C.text_encoder):  # so that sampling finds it from any working directory
        C.text_encoder = os.path.abspath(C.text_encoder)
    if C.image_size == 0:
        C.image_size = 32 if C.dataset == "shapes" else 64


# -----------------------------------------------------------------------------
# Model, EMA, optimizer; restored from the checkpoint when resuming


@dataclasses.dataclass
class TrainState:
    """The model and what trains it, built by build_training; restored from the checkpoint when resuming."""

    model_config: UNetConfig
    model: UNet  # the weights the optimizer updates
    ema: UNet  # their exponential moving average: what evaluations and sample grids draw with
    train_model: torch.nn.Module  # `model` as the loss calls it: compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: NoiseScheduler  # the noise schedule and the prediction target
    step: int  # the next step to train: 0, or the checkpoint's
    wandb_id: str | None  # the W&B run to continue, if any


def build_training(C, data, ckpt, sysinfo):
    dev = sysinfo.device
    model_cfg = dataclasses.replace(unet_config(C), context_dim=data.context_dim)
    # NHWC: the recipes' U-Nets train faster in channels_last than in NCHW, on CUDA and on the CPU
    # (docs/performance.md)
    layout = torch.channels_last
    model = UNet(model_cfg).to(dev, memory_format=layout)
    ema = UNet(model_cfg).to(dev, memory_format=layout).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=C.lr, weight_decay=C.weight_decay, betas=(0.9, 0.999))
    step, wandb_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict brings back the saved weight decay: the run's wins
            group["weight_decay"] = C.weight_decay
        step, wandb_id = ckpt["step"], ckpt["wandb_id"]
        restore_rng(ckpt["rng"], sysinfo)
    train_model = torch.compile(model) if C.compile else model
    if sysinfo.ddp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    scheduler = NoiseScheduler(C.num_timesteps, C.prediction_type).to(dev)
    return TrainState(model_cfg, model, ema, train_model, optimizer, scheduler, step, wandb_id)


# The steps that a time budget times: after the first few (allocations, caches), and inside every recipe's warmup,
# where the learning rate does not depend on max_steps, so that fixing it there changes no earlier step.
BUDGET_STEPS = range(10, 60)


def steps_in_budget(C, step, elapsed, seconds_per_step, seconds_per_eval):
    """max_steps for the time budget C.max_minutes: at `step`, `elapsed` seconds into the loop, each
    further step costs seconds_per_step and each evaluation (every eval_interval steps and at the end)
    seconds_per_eval. The largest N with elapsed + (N - step) * seconds_per_step + evals(N) * seconds_per_eval
    within the budget, and at least one step more than `step`."""
    left = C.max_minutes * 60 - elapsed
    evals = lambda n: n // C.eval_interval - step // C.eval_interval + (n % C.eval_interval != 0)
    cost = lambda n: (n - step) * seconds_per_step + evals(n) * seconds_per_eval  # grows with n
    lo, hi = step + 1, step + 1 + max(0, int(left / seconds_per_step))  # cost(hi) > left unless lo fits nothing
    while lo < hi:  # bisection: the largest n in [lo, hi] with cost(n) <= left (lo if none)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
    return lo


def lr_at(step, C):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < C.warmup_steps:
        return C.lr * (step + 1) / C.warmup_steps
    progress = min(1.0, (step - C.warmup_steps) / max(1, C.max_steps - C.warmup_steps))
    return C.min_lr + 0.5 * (C.lr - C.min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------


def main(argv):
    C, explicit = configure(argv)
    sysinfo = setup_device(C)
    with fail_together(sysinfo):  # under torchrun one rank's error ends every rank, printed once
        return start(C, explicit, sysinfo)


def start(C, explicit, sysinfo):
    """Resume or start the run, take its folder and lock, train; a failed new run leaves no folder."""
    stop = install_stop_handlers()
    lock = created = run_dir = None
    try:
        ckpt, run_dir, lock = resume_run(C, explicit, sysinfo)
        if ckpt is not None and ckpt["step"] >= C.max_steps:  # finished: touch nothing
            if sysinfo.master:
                print(
                    f"run {run_dir} finished at step {ckpt['step']} (max_steps {C.max_steps}); nothing to do. "
                    f"Pass a larger --max_steps to train on (the cosine schedule stretches to the new end)"
                )
            return run_dir
        torch.manual_seed(C.seed + sysinfo.rank)
        resolve_auto(C, sysinfo)
        # a new run's folder is taken before any slow work, so that a second writer learns at once
        if sysinfo.master and lock is None:
            if run_dir is None:
                check_output_dir(C.out_dir)
                run_dir = created = new_run_dir(C.out_dir, os.path.basename(C.dataset.rstrip("/")))
            lock = lock_run(run_dir)
        data, state, evaluator, wandb_run = setup(C, sysinfo, stop, ckpt, run_dir)
        del ckpt  # its tensors now live in the model and the optimizer
        return train(C, sysinfo, stop, run_dir, data, state, evaluator, wandb_run)
    except OSError as e:
        if e.errno is None:
            raise
        # a disk that fills or turns read-only mid-run (log lines, sample grids); checkpoints say so themselves
        raise UserError(
            f"training stopped: {e.filename or run_dir}: {e.strerror}; the last checkpoint in {run_dir} is kept: "
            f"fix that and resume with --resume=auto"
        ) from None
    finally:
        release_lock(lock)
        stop.restore()
        with contextlib.suppress(OSError):
            if created and not os.listdir(created):  # a new run that failed before writing anything leaves no trace
                os.rmdir(created)


def setup(C, sysinfo, stop, ckpt, run_dir):
    """Before the loop: the data, the model (from ckpt when resuming), the evaluator, the banner, W&B."""
    data = load_data(C, sysinfo)
    state = build_training(C, data, ckpt, sysinfo)
    evaluator = Evaluator(C, data, SamplerConfig.from_settings(C), sysinfo)  # rank 0 evaluates and draws grids
    if sysinfo.master:
        print(run_banner(C, data, state, run_dir, sysinfo))
    stop.training = True  # from here a stop signal saves a checkpoint and ends the run
    wandb_run = start_wandb(C, run_dir, state.wandb_id) if sysinfo.master else None
    return data, state, evaluator, wandb_run


def train(C, sysinfo, stop, run_dir, data, state, evaluator, wandb_run):
    """The training loop: lr, then checkpoint / evaluate / sample when due, then batch, loss, step,
    EMA, log. All randomness of step k comes from (seed, k) (get_batch), except dropout's masks,
    which each rank draws from its own RNG stream (restored per rank on resume)."""
    master = sysinfo.master
    model, ema, optimizer, step = state.model, state.ema, state.optimizer, state.step
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    nonfinite = torch.zeros((), dtype=torch.bool, device=sysinfo.device)
    last_good_step, loss_ema, imgs_per_s = step, None, 0.0
    busy = 0.0  # seconds in training steps since the last log
    t_loop, timed, eval_seconds = time.time(), [], None  # for a time budget (max_minutes): the loop's seconds
    bar = tqdm(total=C.max_steps, initial=step, desc="training", disable=not master, dynamic_ncols=True)
    model.train()
    while True:
        lr_now = lr_at(step, C)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        last = step >= C.max_steps
        stopping = stop_requested(sysinfo, stop.signal, step, C.log_interval)

        saving = (step % C.ckpt_interval == 0 and step > 0) or last or stopping
        if (step % C.log_interval == 0 or saving) and any_rank(sysinfo, nonfinite):  # a sync only now and then
            bar.close()
            raise diverged(step, last_good_step, run_dir)
        # the checkpoint first: a stop signal (a scheduler's grace period) must not wait for an evaluation,
        # which a stopped run skips (resuming evaluates this step); evaluation leaves training's random streams alone
        if saving:
            ckpt = checkpoint_state(C, state, data, step, sysinfo, wandb_run)  # a collective: every rank takes part
            if master:
                save_checkpoint(os.path.join(run_dir, CKPT_NAME), ckpt)
            last_good_step = step
        if master and (step % C.eval_interval == 0 or last) and not stopping:
            figures = evaluator(state)
            train_loss = loss_ema or float("nan")
            tqdm.write(
                f"step {step}: val loss {figures['val/loss']:.4f}, train loss {train_loss:.4f}, lr {lr_now:.2e}, "
                f"{imgs_per_s:.0f} img/s" + figures_line(figures, evaluator.sampler.guidance_scale)
            )
            write_log(run_dir, step, figures, wandb_run)
            eval_seconds = eval_seconds or figures["eval/seconds"]
        if C.max_minutes and step == BUDGET_STEPS.stop:  # every rank takes rank 0's answer: one max_steps
            C.max_steps = bar.total = from_rank0(
                sysinfo, budget_line(C, step, time.time() - t_loop, timed, eval_seconds) if master else None
            )
        if master and ((step % C.sample_interval == 0 and step > 0) or last) and not stopping:
            save_samples(C, state, data, evaluator.sampler, step, sysinfo, run_dir, wandb_run)
        if last or stopping:
            break

        t_step = time.time()
        x0, context, mask, t, noise = get_batch(
            data,
            step,
            C.seed,
            sysinfo.rank,
            sysinfo.world,
            C.batch_size,
            C.p_uncond,
            C.num_timesteps,
            C.caption_parts,
            C.t_shift,
        )
        with sysinfo.autocast:
            loss = diffusion_loss(state.train_model, state.scheduler, x0, context, mask, t, noise, C.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), C.grad_clip)
        optimizer.step()
        decay = min(C.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # ema += (1 - decay) * (model - ema)
        nonfinite |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)
        step += 1
        if step % C.log_interval == 0:  # .item() waits for the GPU, so `busy` counts its work, not only the launches
            lossf = all_mean(sysinfo, loss.detach()) if sysinfo.ddp else loss.item()
        busy += time.time() - t_step
        if step - 1 in BUDGET_STEPS:
            timed.append(time.time() - t_step)
        if step % C.log_interval == 0 and master:
            imgs_per_s, busy = C.log_interval * C.batch_size * sysinfo.world / busy, 0.0
            loss_ema = lossf if loss_ema is None else 0.9 * loss_ema + 0.1 * lossf
            bar.set_postfix(loss=f"{lossf:.4f}", img_s=f"{imgs_per_s:.0f}")
            log = {
                "train/loss": lossf,
                "train/lr": lr_now,
                "train/grad_norm": grad_norm.item(),
                "train/images_per_s": imgs_per_s,
            }
            write_log(run_dir, step, log, wandb_run)
        bar.update(1)
    bar.close()
    return finish(sysinfo, stop, model, run_dir, wandb_run, step, stopped=stopping and not last)


def budget_line(C, step, elapsed, timed, eval_seconds):
    """max_steps for the time budget, from the seconds of the steps BUDGET_STEPS (those this process
    ran) and of the first evaluation; says so in one line."""
    per_step = sum(timed) / max(1, len(timed))
    per_eval = eval_seconds or 0.0  # a run resumed after its first evaluation has not timed one
    n = steps_in_budget(C, step, elapsed, per_step, per_eval)
    tqdm.write(
        f"time budget {C.max_minutes:g} min: {C.batch_size / per_step:.0f} img/s over steps {BUDGET_STEPS.start}-"
        f"{BUDGET_STEPS.stop - 1}, {per_eval:.0f} s an evaluation -> max_steps {n} (instead of {C.max_steps}: "
        f"--max_minutes=0 keeps a fixed max_steps)"
    )
    return n


def diverged(step, last_good_step, run_dir):
    kept = (
        f"the last good checkpoint (step {last_good_step}) in {run_dir} is kept"
        if last_good_step > 0
        else "no checkpoint was written yet"
    )
    return UserError(
        f"the loss or the gradients became NaN or inf before step {step}: training stopped; {kept}. "
        f"Lower --lr or raise --warmup_steps"
    )


def finish(sysinfo, stop, model, run_dir, wandb_run, step, stopped):
    """After the loop: the replicas compared, the last line, W&B closed; a stopped run exits as signalled."""
    if sysinfo.ddp:  # DDP keeps replicas in lockstep; check it, as a DDP bug would otherwise pass silently
        check_replicas_identical(sysinfo, model)
    if sysinfo.master:
        how = "stopped by signal at" if stopped else "finished at"
        print(f"{how} step {step}; checkpoint {os.path.join(run_dir, CKPT_NAME)}")
    if wandb_run:
        wandb_run.finish()
    if sysinfo.ddp:
        dist.destroy_process_group()
    if stopped:
        sys.exit(128 + (stop.signal or signal.SIGTERM))  # under torchrun another rank may have had the signal
    return run_dir


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
