"""
Train the text-conditioned diffusion model of diffusion_model.py.

    python train_diffusion.py                          # no GPU: the CPU shapes recipe; a GPU: the GPU recipe
    python train_diffusion.py config/shapes_cpu.py --max_steps=1000  # a config file, then globals as --key=value
    python train_diffusion.py --resume=auto            # continue the latest run in out_dir, with its own settings
    torchrun --nproc_per_node=4 train_diffusion.py     # the same script on 4 GPUs (DDP)

Each run lives in its own folder under out_dir: checkpoints (ckpt.pt), sample grids, the W&B run.
The file reads top to bottom: the settings, the setup of a run (resume, data, model, logging) in
named functions, then `main` with the one training loop.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import shapes
from checkpoints import CKPT_NAME, find_checkpoint, load_checkpoint, save_checkpoint
from configurator import (
    DEVICES,
    UserError,
    check_ranges,
    collect_settings,
    hub_reachable,
    offline_banner,
    parse_config,
    pick_device,
    read_config_file,
    run_cli,
)
from diffusion_model import NoiseScheduler, UNet, UNetConfig, diffusion_loss, sample
from image_data import load_image_dataset, save_grid, split_indices
from text_encoders import TextEncoder, embed_prompts, encode_captions, resolve_text_encoder

# -----------------------------------------------------------------------------
# config: every global below can be set in a config file or overridden as --key=value.
# These defaults are the GPU recipe; without a GPU and without a config file, config/shapes_cpu.py
# is read first (a banner says so).
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
num_timesteps = 1000
prediction_type = "v"  # what the U-Net predicts: v (the velocity, Salimans & Ho) | eps (the noise, Ho et al.)
# training
batch_size = 64  # per process: under torchrun the global batch is batch_size * number of GPUs
max_steps = 30000
lr = 2e-4  # peak learning rate, after linear warmup, then cosine decay to min_lr at max_steps
min_lr = 2e-5
warmup_steps = 500
weight_decay = 0.0
min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0: the plain loss
grad_clip = 1.0
p_uncond = 0.1  # share of captions replaced by the empty caption, for classifier-free guidance
ema_decay = 0.999  # EMA of the weights, warmed up as min(ema_decay, (1 + k) / (10 + k))
# evaluation, samples, checkpoints, logging
eval_interval = 500  # validation loss (and shapes adherence) every this many steps
eval_images = 256  # validation images per evaluation (fixed timesteps and noise)
sample_interval = 1000  # a grid of samples (EMA, CFG, fixed prompts and seed)
sample_guidance = 3.0
# guidance only at noise levels t >= this; below, the conditional model (guiding the nearly clean steps bends unseen
# pairs into seen ones)
sample_guidance_t_min = 300
sample_steps = 50  # DDIM steps for samples and adherence
sample_eta = 1.0  # DDIM's eta there (0 deterministic, 1 stochastic like DDPM)
ckpt_interval = 1000
log_interval = 10
out_dir = "diffusion_results"
resume = ""  # "" (new run) | auto (latest run in out_dir) | a checkpoint file or run folder
wandb_mode = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
wandb_project = "text-diffusion"
# system
device = "auto"  # auto (CUDA, else Apple's mps, else the CPU) | cuda | mps | cpu
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
    num_timesteps="[2, 100000]",
    prediction_type=("v", "eps"),
    batch_size="[1, 65536]",
    max_steps="[1, 1e9]",
    lr="(0, 1]",
    min_lr="[0, 1]",
    warmup_steps="[0, 1e9]",
    weight_decay="[0, 10]",
    min_snr_gamma="[0, 1e4]",
    grad_clip="(0, 1e6]",
    p_uncond="[0, 1)",
    ema_decay="[0, 1)",
    eval_interval="[1, 1e9]",
    eval_images="[1, 100000]",
    sample_interval="[1, 1e9]",
    sample_guidance="[0, 100]",
    sample_guidance_t_min="[0, 100000]",
    sample_steps="[1, 100000]",
    sample_eta="[0, 1]",
    ckpt_interval="[1, 1e9]",
    log_interval="[1, 1e9]",
    out_dir="nonempty",
    resume="text",
    wandb_mode=("auto", "online", "offline", "disabled"),
    wandb_project="nonempty",
    device=DEVICES,
    compile="bool",
    seed="[0, 2147483647]",
)
# the U-Net's settings: UNetConfig's fields but those that come from the data and the text encoder
MODEL_KEYS = tuple(
    f.name for f in dataclasses.fields(UNetConfig) if f.name not in ("image_size", "in_channels", "context_dim")
)
# keys a resumed run must keep: changing them mid-run would train another model on other data (val_fraction and
# eval_images split the images: another value would move trained-on images into validation)
RUN_KEYS = MODEL_KEYS + (
    "dataset",
    "image_column",
    "caption_column",
    "image_size",
    "shapes_num_images",
    "shapes_captions",
    "val_fraction",
    "eval_images",
    "text_encoder",
    "num_timesteps",
    "prediction_type",
    "seed",
)
# keys that describe this invocation, not the run: never taken from a checkpoint
SESSION_KEYS = ("resume", "out_dir", "device")
CPU_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "shapes_cpu.py")


# -----------------------------------------------------------------------------
# Settings: recipe, config files, overrides, ranges


def configure(argv):
    """(C, explicit): every setting, and the keys that a config file or the command line set.
    Without a config file on a machine without a GPU, the CPU recipe is the base."""
    gave_file = any(a.endswith(".py") and not a.startswith("--") for a in argv)
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
    if cpu_recipe and not C.resume:  # a resumed run takes its own settings back instead
        print(
            f"{'no GPU' if kind == 'cpu' else 'no CUDA GPU'} and no config file: training the CPU recipe "
            f"({os.path.relpath(CPU_RECIPE)}, 9-13 min on 2 cores); "
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
    if C.sample_steps > C.num_timesteps:
        raise UserError(
            f"--sample_steps={C.sample_steps} is more than --num_timesteps={C.num_timesteps}: use at most that many"
        )
    if any(level >= len(C.channel_mults) for level in C.attention_levels):
        raise UserError(
            f"--attention_levels={','.join(map(str, C.attention_levels))}: levels are 0..{len(C.channel_mults) - 1} "
            f"for --channel_mults={','.join(map(str, C.channel_mults))}"
        )
    unet_config(C)


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
# Devices and processes: one place for CUDA, autocast and torch.distributed


def setup_device(C):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    kind = pick_device(C.device).type
    use_cuda = kind == "cuda"
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if kind == "mps":
            raise UserError(
                "torchrun with --device=mps: torch.distributed does not run on Apple's GPU; train in one process"
            )
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else kind)
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA; plain fp32 on the CPU, where bf16 is slow on most processors, and on Apple's GPU
    # (mps), whose autocast and bf16 support depend on the macOS and torch versions
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, device=dev, autocast=autocast, master=rank == 0)


def from_rank0(sysinfo, value):
    """Rank 0's value on every rank (e.g. whether the Hub answered), so that all ranks decide alike."""
    if not sysinfo.ddp:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(sysinfo, flag):
    """True if `flag` (a bool tensor) is true on any rank."""
    if sysinfo.ddp:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def all_mean(sysinfo, x):
    """The mean of a scalar tensor over ranks, as a float (the loss of the global batch)."""
    x = x.float().clone()
    dist.all_reduce(x)
    return x.item() / sysinfo.world


def stop_requested(sysinfo, local_signal, step, every):
    """Under torchrun every rank must stop at the same step, so the flag is all-reduced, and only
    every `every` steps: the all-reduce waits for the GPU, which must not happen every step."""
    if not sysinfo.ddp:
        return bool(local_signal)
    if step % every:
        return False
    flag = torch.tensor([1 if local_signal else 0], device=sysinfo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather_rng(sysinfo, state):
    """Every rank's RNG state (dropout draws from it), so a resumed DDP run continues each rank's."""
    if not sysinfo.ddp:
        return [state]
    states = [None] * sysinfo.world
    dist.all_gather_object(states, state.cpu())
    return states


class ReplicasDiverged(RuntimeError):
    """The DDP ranks hold different weights: a bug, not the user's input (a traceback, not one line)."""


def check_replicas_identical(sysinfo, model):
    """Every rank compares a checksum of its weights (their sum and a position-weighted sum, so that
    swapped entries count too) with rank 0's; all ranks raise ReplicasDiverged if any differs."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    position_weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype).sin()
    mine = torch.stack([flat.sum(), (flat * position_weights).sum()])
    rank0s = mine.clone()
    dist.broadcast(rank0s, src=0)
    all_same = torch.tensor([int(torch.equal(mine, rank0s))], device=mine.device)
    dist.all_reduce(all_same, op=dist.ReduceOp.MIN)  # 0 if any rank differs
    if not bool(all_same):
        raise ReplicasDiverged("DDP replicas diverged: the ranks hold different weights")
    if sysinfo.master:
        print(f"all {sysinfo.world} ranks hold identical weights")


# -----------------------------------------------------------------------------
# Stop signals: Ctrl-C or SIGTERM before training exits at once, during training saves and exits


def install_stop_handlers():
    """Returns the flag the loop reads; `stop.restore()` puts the previous handlers back."""
    stop = SimpleNamespace(signal=0, training=False)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop.restore = lambda: [signal.signal(s, h) for s, h in previous.items()]

    def handler(signum, frame):
        if not stop.training:  # loading data or the encoder: nothing to save yet, nothing was written
            print(f"stopped by signal {signum} before training started; nothing was written", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.signal = signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


# -----------------------------------------------------------------------------
# Resume: the run's own settings come back from its checkpoint


def resume_run(C, explicit, sysinfo):
    """Load the checkpoint to resume (or None), and set C to the run's stored settings except
    those given explicitly. Identity keys (RUN_KEYS) must not change; other explicit changes are
    allowed and printed. Rank 0 takes the run's lock before reading the checkpoint: a process that
    saves and exits meanwhile has its last checkpoint read, not the one before. Returns
    (ckpt, run_dir, lock); on an error the lock is released."""
    if not C.resume:
        return None, None, None
    lock = None
    try:
        # rank 0 finds the checkpoint and locks its run; every rank then resumes that one
        path = find_checkpoint(C.out_dir if C.resume == "auto" else C.resume) if sysinfo.master else None
        if path is not None:
            lock = lock_run(os.path.dirname(os.path.abspath(path)))
        path = from_rank0(sysinfo, path)
        if path is None:
            if C.resume != "auto":
                raise UserError(f"--resume={C.resume}: no checkpoint there (pass a ckpt.pt, a run folder, or auto)")
            if sysinfo.master:
                print(f"resume=auto: no run in {C.out_dir} yet, starting a new one")
            check_consistency(C)
            return None, None, None
        ckpt = load_checkpoint(path)
        missing = [k for k in ("ema", "optimizer", "rng", "config") if k not in ckpt]
        if missing:
            raise UserError(
                f"{path} holds no {', '.join(missing)}: it cannot be resumed exactly; sample from it with "
                f"sample_diffusion.py, or start a new run (drop --resume)"
            )
        stored = ckpt["config"]
        lacking = [k for k in DEFAULTS if k not in stored]
        if lacking:
            raise UserError(
                f"{path} was written by another version of train_diffusion.py (its settings lack "
                f"{', '.join(lacking)}): start a new run (drop --resume)"
            )
        for k in DEFAULTS:
            if k in SESSION_KEYS:
                continue
            if k in explicit and getattr(C, k) != stored[k]:
                if k in RUN_KEYS:
                    raise UserError(
                        f"--{k}={getattr(C, k)} differs from the resumed run's {stored[k]}: drop it or start a new run"
                    )
                if sysinfo.master:
                    print(f"resuming with {k} {getattr(C, k)} instead of {stored[k]}")
                continue
            setattr(C, k, stored[k])
        check_ranges(vars(C), RANGES)  # a checkpoint's settings are checked like the command line's
        check_consistency(C)
        check_layout(C, ckpt["model_args"], path)
        return ckpt, os.path.dirname(os.path.abspath(path)), lock
    except BaseException:
        release_lock(lock)
        raise


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
# One writer per run: a lock file in the run folder


def new_run_dir(out_dir, name):
    """A new run folder, created atomically: two runs started in the same second get two folders."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{name}")
    for i in range(1000):
        path = base if i == 0 else f"{base}-{i}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {out_dir}: clean up old runs")


def lock_run(run_dir):
    """Take the run folder for this process: run.lock holds pid and host, created with O_EXCL so
    that of two processes exactly one gets it (on Linux, macOS and Windows). A lock left on this host
    by a process that is gone, or that holds this process's own pid (a restarted container numbers
    its processes anew), is taken over with a warning, under a second lock (filelock) so that of two
    processes taking it over one does and the other then sees it held. A live holder is an error
    naming it; a holder on another host cannot be checked from here, and the error says how to take
    the run over once that host is checked. Returns the lock's path."""
    path = os.path.join(run_dir, "run.lock")
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # being written this instant: look again
                time.sleep(0.1)
                continue
            pid, host = holder
            if host != socket.gethostname():
                raise UserError(
                    f"run {run_dir} is locked by process {pid} on host {host}, which this host cannot check: "
                    f"if no process on {host} trains this run any more, delete {path} and rerun"
                )
            if pid != os.getpid() and pid_alive(pid):
                raise UserError(
                    f"run {run_dir} is in use by process {pid} on {host}: wait for it to end, stop it, "
                    f"or start a new run (drop --resume)"
                )
            take_over_stale_lock(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return path
    raise UserError(f"could not take the lock {path}: delete it if no process is training this run, then rerun")


def take_over_stale_lock(path, holder):
    """Remove run.lock if it still holds `holder` (a process that is gone). The check and the removal
    run under a filelock, so that two processes never both remove: the second one finds the first's
    new lock. The guard file is deleted afterwards (a guard taken meanwhile on the deleted file still
    finds the stale lock gone)."""
    import filelock

    guard = filelock.FileLock(path + ".takeover", timeout=30)
    with guard:
        if read_lock(path) == holder:  # still the stale one: nobody took it over meanwhile
            print(
                f"warning: {os.path.dirname(path)} was locked by process {holder[0]}, which is gone: "
                "taking the run over",
                file=sys.stderr,
            )
            os.remove(path)
    with contextlib.suppress(OSError):
        os.remove(path + ".takeover")


def read_lock(path):
    """(pid, host) of a lock file, or None while it is being written (or is damaged)."""
    try:
        pid, host = open(path).read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    """Is process `pid` of this host running? On Windows os.kill would end it: ask the kernel instead."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(path):
    """Remove run.lock if this process holds it (a lock another process took over is left alone)."""
    if path is None:
        return
    holder = read_lock(path)
    if holder is not None and holder[0] == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(path)


# -----------------------------------------------------------------------------
# Data and text: images in memory, every distinct caption embedded once


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


def load_data(C, sysinfo):
    """Images, the caption table and the fixed prompts for sample grids and the judge."""
    images, captions, name, flip_ok = load_image_dataset(C)
    encoder = TextEncoder(C.text_encoder, sysinfo.device)
    n_cut = encoder.count_truncated(captions)
    if sysinfo.master and n_cut:
        print(f"warning: {n_cut} captions are longer than {encoder.max_length} tokens and were cut", file=sys.stderr)
    ctx_table, ctx_mask, rows = encode_captions(encoder, captions)
    val_idx, train_idx = split_indices(len(images), C.seed, C.val_fraction, C.eval_images)
    if len(train_idx) // sysinfo.world < C.batch_size:
        raise UserError(
            f"batch_size {C.batch_size} is larger than the {len(train_idx) // sysinfo.world} training images "
            f"per process: lower --batch_size"
        )
    dev = sysinfo.device
    D = SimpleNamespace(
        name=name,
        flip_ok=flip_ok,
        context_dim=encoder.dim,
        ctx_table=ctx_table.to(dev),
        ctx_mask=ctx_mask.to(dev),
        train_images=images[train_idx].to(dev),
        train_rows=rows[train_idx].to(dev),  # small datasets live on the device as uint8
        val_images=images[val_idx],
        val_rows=rows[val_idx],
        judge_prompts=None,
    )
    # fixed prompts for sample grids: the judge's prompts on shapes, validation captions elsewhere
    if C.dataset == "shapes":
        D.judge_prompts = shapes.eval_prompts()
        D.judge_ctx = embed_prompts(encoder, [p["caption"] for p in D.judge_prompts], dev)
        D.sample_prompts = [p["caption"] for p in D.judge_prompts][:16]
    else:
        D.sample_prompts = [captions[i] for i in val_idx[:8].tolist()]
    D.sample_cond, D.sample_uncond = embed_prompts(encoder, D.sample_prompts, dev)
    D.real_art = None  # set by load_real_art on rank 0 for image datasets
    return D


def load_real_art(C, D, sysinfo):
    """The real side of the quality evaluation (image datasets, rank 0): features of the held-out
    and the training art, computed once. Without the metric's packages training goes on without it."""
    if C.dataset == "shapes" or not sysinfo.master:
        return None
    import image_quality

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


def global_batch_indices(step, n, global_batch, seed):
    """The image indices of global batch `step`: each epoch is one permutation of the training set
    cut into global batches; under torchrun rank r trains on slice r of it. A pure function of the
    step, so a resumed run replays the same data, and N ranks see what one process would."""
    steps_per_epoch = n // global_batch
    epoch, pos = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * global_batch : (pos + 1) * global_batch]


# -----------------------------------------------------------------------------
# Model, EMA, optimizer; restored from the checkpoint when resuming


def build_training(C, D, ckpt, sysinfo):
    dev = sysinfo.device
    model_cfg = dataclasses.replace(unet_config(C), context_dim=D.context_dim)
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
    return SimpleNamespace(
        cfg=model_cfg,
        model=model,
        ema=ema,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        wandb_id=wandb_id,
    )


def restore_rng(rng, sysinfo):
    """Each rank continues its own random streams: rank r takes entry r (a checkpoint written by
    fewer ranks gives the extra ranks entry 0)."""
    mine = lambda states: states[sysinfo.rank] if sysinfo.rank < len(states) else states[0]
    torch.set_rng_state(mine(rng["torch"]))
    if sysinfo.device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(mine(rng["cuda"]), sysinfo.device)


def checkpoint_state(C, M, D, step, sysinfo, wandb_run):
    """What ckpt.pt holds. Collective under torchrun: every rank must call it."""
    rng = dict(
        torch=gather_rng(sysinfo, torch.get_rng_state()),
        cuda=gather_rng(sysinfo, torch.cuda.get_rng_state(sysinfo.device)) if sysinfo.device.type == "cuda" else [],
    )
    return dict(
        model=M.model.state_dict(),
        ema=M.ema.state_dict(),
        optimizer=M.optimizer.state_dict(),
        step=step,
        model_args=dataclasses.asdict(M.cfg),
        num_timesteps=C.num_timesteps,
        prediction_type=C.prediction_type,
        text_encoder=C.text_encoder,
        dataset=D.name,
        config=vars(C),
        wandb_id=wandb_run.id if wandb_run else None,
        rng=rng,
    )


def lr_at(step, C):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < C.warmup_steps:
        return C.lr * (step + 1) / C.warmup_steps
    progress = min(1.0, (step - C.warmup_steps) / max(1, C.max_steps - C.warmup_steps))
    return C.min_lr + 0.5 * (C.lr - C.min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Evaluation and logging


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


def evaluate(C, M, D, step, sysinfo, lr_now, loss_ema, imgs_per_s):
    """Validation loss; on shapes the judge's adherence with and without guidance; on image
    datasets KID against the held-out art and the copy share (image_quality.py): (log, line)."""
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
        w = C.sample_guidance
        adh = shapes.sample_adherence(
            M.ema,
            M.scheduler,
            D.judge_prompts,
            *D.judge_ctx,
            (0.0, w),
            C.sample_steps,
            C.seed,
            sysinfo.autocast,
            eta=C.sample_eta,
            guidance_t_min=C.sample_guidance_t_min,
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
            images = sample(
                M.ema,
                M.scheduler,
                (D.ctx_table[r], D.ctx_mask[r]),
                (D.ctx_table[:1], D.ctx_mask[:1]),
                guidance_scale=C.sample_guidance,
                sampler="ddim",
                steps=C.sample_steps,
                eta=C.sample_eta,
                generator=[torch.Generator().manual_seed(C.seed * 100003 + i) for i in range(len(r))],
                guidance_t_min=C.sample_guidance_t_min,
            )  # per-image noise, as benchmarks.quality draws it
        log.update({f"quality/{k}": v for k, v in D.real_art.score(images).items()})
        log["quality/seconds"] = time.time() - t0
        line += " | KID {:.2f} +- {:.2f}, copies {:.2f}".format(
            log["quality/kid"], log["quality/kid_std"], log["quality/copy_share"]
        )
    return log, line


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


# -----------------------------------------------------------------------------


def main(argv):
    C, explicit = configure(argv)
    sysinfo = setup_device(C)
    stop = install_stop_handlers()
    lock = created = None
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
                run_dir = created = new_run_dir(C.out_dir, os.path.basename(C.dataset.rstrip("/")))
            lock = lock_run(run_dir)
        return train(C, sysinfo, stop, ckpt, run_dir)
    finally:
        release_lock(lock)
        stop.restore()
        with contextlib.suppress(OSError):
            if created and not os.listdir(created):  # a new run that failed before writing anything leaves no trace
                os.rmdir(created)


def train(C, sysinfo, stop, ckpt, run_dir):
    dev, master = sysinfo.device, sysinfo.master
    D = load_data(C, sysinfo)
    M = build_training(C, D, ckpt, sysinfo)
    del ckpt
    D.real_art = load_real_art(C, D, sysinfo)
    if master:
        print(run_banner(C, D, M, run_dir, sysinfo))
    stop.training = True  # from here a stop signal saves a checkpoint and ends the run
    wandb_run = start_wandb(C, run_dir, M.wandb_id) if master else None
    model, ema, optimizer, step = M.model, M.ema, M.optimizer, M.step

    # -------------------------------------------------------------------------- training loop
    bar = tqdm(total=C.max_steps, initial=step, desc="training", disable=not master, dynamic_ncols=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    last_good_step, loss_ema, imgs_per_s = step, None, 0.0
    busy = 0.0  # seconds in training steps since the last log
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    rng_dev = dev if dev.type == "cuda" else torch.device("cpu")  # on mps the step's draws come from the CPU
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
            kept = (
                f"the last good checkpoint (step {last_good_step}) in {run_dir} is kept"
                if last_good_step > 0
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"the loss or the gradients became NaN or inf before step {step}: training stopped; {kept}. "
                f"Lower --lr or raise --warmup_steps"
            )
        # the checkpoint first: a stop signal (a scheduler's grace period) must not wait for an evaluation,
        # which a stopped run skips (resuming evaluates this step); evaluation leaves training's random streams alone
        if saving:
            state = checkpoint_state(C, M, D, step, sysinfo, wandb_run)  # a collective: every rank takes part
            if master:
                save_checkpoint(os.path.join(run_dir, CKPT_NAME), state)
            last_good_step = step
        if master and (step % C.eval_interval == 0 or last) and not stopping:
            t_eval = time.time()
            log, line = evaluate(C, M, D, step, sysinfo, lr_now, loss_ema, imgs_per_s)
            log["eval/seconds"] = time.time() - t_eval  # so that evaluation's share of the run's minutes stays visible
            tqdm.write(line)
            write_log(run_dir, step, log)
            if wandb_run:
                wandb_run.log(log, step=step)
        if master and ((step % C.sample_interval == 0 and step > 0) or last) and not stopping:
            with sysinfo.autocast:
                grid = sample(
                    ema,
                    M.scheduler,
                    D.sample_cond,
                    D.sample_uncond,
                    guidance_scale=C.sample_guidance,
                    sampler="ddim",
                    steps=C.sample_steps,
                    eta=C.sample_eta,
                    generator=C.seed,
                    guidance_t_min=C.sample_guidance_t_min,
                )
            grid_path = os.path.join(run_dir, f"samples_{step:07d}.png")
            save_grid(grid, grid_path)
            if wandb_run:
                import wandb

                wandb_run.log({"samples": wandb.Image(grid_path, caption=" | ".join(D.sample_prompts))}, step=step)
        if last or stopping:
            break

        # forward, backward, step. All randomness of step k is drawn for the global batch from
        # (seed, k) and each rank takes its slice: resumable, and identical to one big process except for
        # dropout's masks, which each rank draws from its own RNG stream (restored per rank on resume).
        t_step = time.time()
        G, B = C.batch_size * sysinfo.world, C.batch_size
        g = torch.Generator(device=rng_dev).manual_seed(C.seed * 1_000_003 + step)
        drop = (torch.rand(G, generator=g, device=rng_dev) < C.p_uncond).to(dev)
        flip = (torch.rand(G, generator=g, device=rng_dev) < 0.5).to(dev)
        t = torch.randint(0, C.num_timesteps, (G,), generator=g, device=rng_dev).to(dev)
        noise = torch.randn((G, *D.train_images.shape[1:]), generator=g, device=rng_dev).to(dev)
        mine = slice(sysinfo.rank * B, (sysinfo.rank + 1) * B)
        idx = global_batch_indices(step, len(D.train_images), G, C.seed)[mine].to(dev)
        x0 = D.train_images[idx].float() / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
        if D.flip_ok:
            x0 = torch.where(flip[mine, None, None, None], x0.flip(3), x0)
        r = torch.where(drop[mine], 0, D.train_rows[idx])  # caption dropout: row 0 is the empty caption
        with sysinfo.autocast:
            loss = diffusion_loss(
                M.train_model, M.scheduler, x0, D.ctx_table[r], D.ctx_mask[r], t[mine], noise[mine], C.min_snr_gamma
            )
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
            write_log(run_dir, step, log)
            if wandb_run:
                wandb_run.log(log, step=step)
        bar.update(1)
    bar.close()

    if sysinfo.ddp:  # DDP keeps replicas in lockstep; check it, as a DDP bug would otherwise pass silently
        check_replicas_identical(sysinfo, model)
    if master:
        how = "stopped by signal at" if stopping and not last else "finished at"
        print(f"{how} step {step}; checkpoint {os.path.join(run_dir, CKPT_NAME)}")
    if wandb_run:
        wandb_run.finish()
    if sysinfo.ddp:
        dist.destroy_process_group()
    if stopping and not last:
        sys.exit(128 + (stop.signal or signal.SIGTERM))  # under torchrun another rank may have had the signal
    return run_dir


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
