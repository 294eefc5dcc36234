"""
Our U-Net (diffusion_model.UNet) against diffusers' UNet2DConditionModel built to the same layout:
parameter counts, training-step throughput and peak memory.

    python -m benchmarks.bench_unet                              # CPU: 32 px and 64 px, eager
    python -m benchmarks.bench_unet --device=cuda --compile=true # GPU: bf16, channels_last, eager and torch.compile
    python -m benchmarks.bench_unet --image_sizes=32 --repeats=3 --threads=2

What it measures, for each image size:

- parameters of both models and their ratio; the script stops with exit code 1 if they differ by
  more than 10%, because then the two are not the same network and the timings mean nothing.
- training-step throughput in images/s: forward, MSE loss against the noise, backward, AdamW step,
  on one fixed batch shared by both models (x (B, 3, S, S), t (B,), context (B, L, D) and a padding
  mask; ours takes it as `context_mask`, diffusers as `encoder_attention_mask`). After a warm-up,
  the models are timed in turn (ours, diffusers, ours, diffusers, ...) for `repeats` rounds of
  `steps` training steps each, so that a slow spell of the machine hits both; the table shows
  medians.
- peak memory of one training step. CUDA: torch.cuda.max_memory_allocated, counted as if the model
  were alone on the GPU (its weights, gradients, AdamW state and the step's activations; the shared
  batch excluded). CPU: each model runs 2 steps in a fresh subprocess and the script reports that
  process's peak RSS minus its RSS before the model was built (after the imports); this includes
  the runtime's one-time allocations, about 55 MiB for either model.
- FLOPs of one training step (matmuls, convolutions and attention, forward and backward, counted by
  torch.utils.flop_counter.FlopCounterMode on one image and multiplied by the batch) and, on CUDA,
  model-FLOPs utilisation: achieved FLOP/s over the GPU's dense bf16 peak (n/a for unknown GPUs).

The two networks have the same parameters and compute the same function up to initialisation; what
differs in how they compute it: ours fuses q, k, v (self-attention) and k, v (cross-attention) into
one matmul each, diffusers projects them separately; ours hands SDPA the padding mask as a bool
(B, 1, 1, L), diffusers turns it into an additive -10000 bias and repeats it per head; diffusers uses
one GroupNorm group count (32) where ours uses min(32, C/4), i.e. 16 groups at 64 channels; diffusers
divides every resnet output by output_scale_factor (1.0), one more elementwise op, and its
Upsample2D makes the tensor contiguous (leaving channels_last) when the batch is 64 or more.

On CUDA both models run under bf16 autocast in channels_last with PyTorch's scaled_dot_product_attention
(ours calls it directly; diffusers through AttnProcessor2_0); --compile=true adds rows with both models
torch.compile'd. Keys (--key=value): image_sizes, batch_size, context_len, repeats, steps (training
steps per timed round; 0 = 2 on CPU, 20 on CUDA), base_channels, channel_mults, num_res_blocks,
attention_levels, n_heads, context_dim, device (auto|cpu|cuda), compile, threads (0 = torch's default).
"""

import contextlib
import dataclasses
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from configurator import UserError, parse_config, pick_device, run_cli
from diffusion_model import UNet, UNetConfig

DEFAULTS = dict(
    image_sizes=(32, 64),
    batch_size=16,
    context_len=16,
    repeats=5,
    steps=0,
    base_channels=64,
    channel_mults=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(1, 2),
    n_heads=4,
    context_dim=384,
    device="auto",
    compile=False,
    threads=0,
)
DIFFUSERS_NORM_GROUPS = 32  # one value for every GroupNorm; divides every width, since base_channels % 32 == 0
MAX_PARAM_MISMATCH = 0.10


def bf16_peak_flops(gpu_name):
    """Dense bf16 tensor-core peak (FLOP/s) of the GPUs we know, else None."""
    if "H200" in gpu_name:
        return 989e12
    if "H100" in gpu_name and (
        "SXM" in gpu_name or "HBM3" in gpu_name
    ):  # the SXM card calls itself "NVIDIA H100 80GB HBM3"
        return 989e12
    return None


# -----------------------------------------------------------------------------
# The two models


def diffusers_kwargs(cfg):
    """UNet2DConditionModel arguments for the layout of our UNetConfig."""
    levels = range(len(cfg.channel_mults))
    down = ["CrossAttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D" for lvl in levels]
    up = ["CrossAttnUpBlock2D" if lvl in cfg.attention_levels else "UpBlock2D" for lvl in reversed(levels)]
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
        layers_per_block=cfg.num_res_blocks,  # diffusers, like ours, puts one more in each up block
        transformer_layers_per_block=1,
        cross_attention_dim=cfg.context_dim,
        # diffusers' historical naming: `attention_head_dim` is passed on to the blocks as their number of
        # heads (num_attention_heads = num_attention_heads or attention_head_dim, and passing
        # num_attention_heads itself raises). So this gives n_heads heads of width channels / n_heads, as ours.
        attention_head_dim=cfg.n_heads,
        resnet_time_scale_shift="scale_shift",  # (1 + scale, shift) after norm2, as our ResnetBlock
        norm_num_groups=DIFFUSERS_NORM_GROUPS,
        norm_eps=1e-6,  # our GroupNorms' eps (diffusers' attention blocks use 1e-6 anyway)
        act_fn="silu",
        flip_sin_to_cos=True,  # [cos, sin] sinusoidal features with frequencies down from 1, as ours
        freq_shift=0,
        dropout=cfg.dropout,
    )


def build(which, cfg, device, channels_last=False):
    torch.manual_seed(0)
    if which == "ours":
        model = UNet(cfg)
    else:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        model = UNet2DConditionModel(**diffusers_kwargs(cfg))
        model.set_attn_processor(AttnProcessor2_0())  # F.scaled_dot_product_attention, diffusers' default
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def forward(which, model, batch):
    x, t, context, mask, _ = batch
    if which == "ours":
        return model(x, t, context, context_mask=mask)
    return model(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False)[0]


def make_batch(cfg, batch_size, context_len, device, channels_last=False):
    """One fixed batch for both models; the mask keeps 2..L tokens per caption (True = real token)."""
    g = torch.Generator().manual_seed(0)
    S, B, L = cfg.image_size, batch_size, context_len
    x = torch.randn(B, cfg.in_channels, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, L, cfg.context_dim, generator=g)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]  # (B, L) bool
    target = torch.randn(B, cfg.in_channels, S, S, generator=g)
    x, target = x.to(device), target.to(device)
    if channels_last:
        x, target = (
            x.contiguous(memory_format=torch.channels_last),
            target.contiguous(memory_format=torch.channels_last),
        )
    return x, t.to(device), context.to(device), mask.to(device), target


def train_step(which, model, optimizer, batch, autocast):
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = F.mse_loss(forward(which, model, batch).float(), batch[4].float())
    loss.backward()
    optimizer.step()


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def step_flops(which, model, cfg, context_len, device):
    """FLOPs of one training step's forward + backward for a batch of one image (they scale linearly
    with the batch). The attention is run by the math backend here, whose matmuls the counter sees on
    every device (it does not know the CPU's fused attention kernel); the FLOPs are the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch = make_batch(cfg, 1, context_len, device)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        loss = F.mse_loss(forward(which, model, batch).float(), batch[4])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# Peak memory


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cuda_peak_mib(which, model, optimizer, batch, autocast):
    """One training step's peak allocated memory as if this model were alone on the GPU: the peak
    above what was allocated before the step (everything else, the other model included), plus
    this model's own weights, gradients and AdamW state."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(which, model, optimizer, batch, autocast)
    torch.cuda.synchronize()
    own = tensor_bytes(model.parameters()) + tensor_bytes(p.grad for p in model.parameters())
    own += tensor_bytes(v for state in optimizer.state.values() for v in state.values())
    return (torch.cuda.max_memory_allocated() - before + own) / 2**20


def proc_status_mib(key):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB -> MiB


def child_peak_rss_mib(which, cfg_dict, batch_size, context_len, threads):
    """Runs in a fresh process: peak RSS of 2 training steps minus the RSS before the model existed."""
    if threads:
        torch.set_num_threads(threads)
    cfg = UNetConfig(**cfg_dict)
    from diffusers import UNet2DConditionModel  # noqa: F401  (imported for both models, before the reset)

    # Reset the peak to the current RSS, so that the imports' own peak does not count. (Not
    # getrusage's ru_maxrss: it survives fork + exec, so a child starts with its parent's peak.)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_mib("VmRSS")
    model = build(which, cfg, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(cfg, batch_size, context_len, "cpu")
    for _ in range(2):  # the second step also holds AdamW's state
        train_step(which, model, optimizer, batch, contextlib.nullcontext())
    return proc_status_mib("VmHWM") - before


def cpu_peak_rss_mib(which, cfg, batch_size, context_len, threads):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(child_peak_rss_mib, (which, dataclasses.asdict(cfg), batch_size, context_len, threads))


# -----------------------------------------------------------------------------


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.context_len < 2 or C.batch_size < 1 or C.repeats < 1:
        raise UserError("--context_len must be >= 2, --batch_size and --repeats >= 1")
    device = pick_device(C.device)
    cuda = device.type == "cuda"
    if C.threads:
        torch.set_num_threads(C.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    steps = C.steps or (20 if cuda else 2)
    B, L = C.batch_size, C.context_len
    peak = bf16_peak_flops(torch.cuda.get_device_name(device)) if cuda else None
    import diffusers

    print(
        f"device {device} ({machine_name(device)}) | {'bf16 autocast, channels_last' if cuda else 'fp32'} | "
        f"batch {B}, {L} text tokens | {C.repeats} interleaved rounds of {steps} steps after warm-up"
    )
    rows = []
    for size in C.image_sizes:
        try:
            cfg = UNetConfig(
                image_size=size,
                base_channels=C.base_channels,
                channel_mults=C.channel_mults,
                num_res_blocks=C.num_res_blocks,
                attention_levels=C.attention_levels,
                n_heads=C.n_heads,
                context_dim=C.context_dim,
            )
        except ValueError as e:
            raise UserError(str(e)) from None
        models = {which: build(which, cfg, device, channels_last=cuda) for which in ("ours", "diffusers")}

        n = {which: count_params(m) for which, m in models.items()}
        ratio = n["ours"] / n["diffusers"]
        print(
            f"\n{size}px: params ours {n['ours'] / 1e6:.3f}M, diffusers {n['diffusers'] / 1e6:.3f}M, ours/diffusers "
            f"{ratio:.4f}"
        )
        if abs(ratio - 1) > MAX_PARAM_MISMATCH:
            print(
                f"FAIL: the parameter counts differ by {abs(ratio - 1):.1%} (> {MAX_PARAM_MISMATCH:.0%}): "
                f"the diffusers model is not built to our layout, so its timings would compare different networks",
                file=sys.stderr,
            )
            sys.exit(1)
        groups = [m.num_groups for m in models["ours"].modules() if isinstance(m, torch.nn.GroupNorm)]
        print(
            f"{size}px: GroupNorm groups: diffusers {DIFFUSERS_NORM_GROUPS} everywhere; ours min(32, C/4): 32 in "
            f"{groups.count(32)} of {len(groups)} layers, fewer in the rest ({sorted(set(groups))})"
        )
        print(f"{size}px: diffusers config {diffusers_kwargs(cfg)}")
        flops = {which: step_flops(which, m, cfg, L, device) * B for which, m in models.items()}
        print(
            f"{size}px: training-step FLOPs (fwd + bwd, batch {B}): ours {flops['ours'] / 1e9:.1f} G, "
            f"diffusers {flops['diffusers'] / 1e9:.1f} G"
        )

        batch = make_batch(cfg, B, L, device, channels_last=cuda)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for mode in ["eager"] + (["compile"] if C.compile else []):
            if mode == "compile":
                runners = {which: torch.compile(m) for which, m in models.items()}
            else:
                runners = dict(models)
            optimizers = {which: torch.optim.AdamW(m.parameters(), lr=1e-4) for which, m in models.items()}

            def run(which, k):
                for _ in range(k):
                    train_step(which, runners[which], optimizers[which], batch, autocast)

            t0 = time.perf_counter()
            for which in runners:  # warm-up: kernels, allocator, AdamW state and (compile) compilation
                run(which, 3)
            sync()
            print(f"{size}px {mode}: warm-up {time.perf_counter() - t0:.1f}s")
            seconds = {which: [] for which in runners}
            for r in range(C.repeats):
                for which in runners:  # interleaved: ours, diffusers, ours, diffusers, ...
                    sync()
                    t0 = time.perf_counter()
                    run(which, steps)
                    sync()
                    seconds[which].append(time.perf_counter() - t0)
                print(
                    f"{size}px {mode}: round {r + 1}/{C.repeats}: "
                    + ", ".join(f"{which} {steps * B / seconds[which][-1]:.1f} img/s" for which in runners)
                )
            img_s = {which: steps * B / statistics.median(s) for which, s in seconds.items()}

            if cuda:
                mem = {
                    which: cuda_peak_mib(which, runners[which], optimizers[which], batch, autocast) for which in runners
                }
            elif mode == "eager":
                mem = {which: cpu_peak_rss_mib(which, cfg, B, L, C.threads) for which in runners}
            else:
                mem = {which: None for which in runners}  # a compiled subprocess would measure the compiler
            mfu = {which: flops[which] * img_s[which] / B / peak if peak else None for which in runners}
            rows.append((size, mode, img_s, mem, mfu))

    mem_how = (
        "CUDA max_memory_allocated, model alone"
        if cuda
        else "peak RSS of a fresh process, 2 steps, minus its RSS before the model"
    )
    print(
        f"\nTraining step (forward + MSE + backward + AdamW), median of {C.repeats} interleaved rounds; "
        f"peak memory: {mem_how}; MFU: FLOP/s over the GPU's dense bf16 peak"
    )
    print(
        "| image | mode | ours img/s | diffusers img/s | ours/diffusers "
        "| ours peak MiB | diffusers peak MiB | ours MFU | diffusers MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fmt_mem = lambda v: "n/a" if v is None else f"{v:.0f}"
    fmt_mfu = lambda v: "n/a" if v is None else f"{v:.1%}"
    for size, mode, img_s, mem, mfu in rows:
        print(
            f"| {size}px | {mode} | {img_s['ours']:.1f} | {img_s['diffusers']:.1f} | "
            f"{img_s['ours'] / img_s['diffusers']:.2f} | "
            f"{fmt_mem(mem['ours'])} | {fmt_mem(mem['diffusers'])} | {fmt_mfu(mfu['ours'])} | "
            f"{fmt_mfu(mfu['diffusers'])} |"
        )
    print(
        f"\nmachine: {machine_name(device)} | torch {torch.__version__} | diffusers {diffusers.__version__} | "
        f"command: python -m benchmarks.bench_unet {shlex.join(argv)}".rstrip()
    )
    return rows


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
