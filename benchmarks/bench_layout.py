"""
Training-step speed of a recipe's U-Net on this machine, by memory layout, torch.compile and bf16
autocast: the CPU levers that change no result (bf16: within rounding), only the seconds.

    python -m benchmarks.bench_layout  # config/shapes_cpu.py and config/shapes_16px.py
    python -m benchmarks.bench_layout --configs=config/shapes_cpu.py --compile=false --rounds=3
    python -m benchmarks.bench_layout --configs=config/pokemon_cpu.py --compile=false --bf16=true
    python -m benchmarks.bench_layout --configs=config/pokemon_cpu.py --compile=false --bf16=true --profile=true

For each config file: its U-Net (MiniLM's 384-d tokens, 12 of them), AdamW, one fixed batch of the
recipe's batch_size, forward + v-loss-shaped MSE + backward + step, as train_diffusion.py runs it.
With --bf16, channels_last again under torch.autocast("cpu", bfloat16), as train_diffusion.py runs
--dtype=bf16: the matmuls and convolutions in bf16, the weights, the optimizer, the norms and
attention in fp32 (diffusion_model.GroupNorm32 and attention()); and once more as plain autocast
leaves it, with GroupNorm and attention in bf16 too, which shows what those two exceptions buy. It
pays only on CPUs whose bf16 matrix instructions outrun their fp32 FMAs (AMX does, and avx512_bf16 on an
AMD EPYC; avx512_bf16 on a Xeon did not: docs/performance.md); --bf16 also prints the raw matmul and
3x3 convolution rates in fp32 and bf16 that set this ceiling, and --profile the ops that take the most time in each bf16
setup (torch.profiler, 5 steps). Setups are timed in turn (NCHW, channels_last, compiled,
NCHW, ...) for --rounds rounds of --steps steps each, so that a slow spell of the machine hits all
of them; the table shows the median images/s, its ratio to NCHW, and for torch.compile the seconds
its first steps took to compile: it pays back only in a run where (1 - 1/ratio) x the run's training
seconds exceed that.
"""

import contextlib
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import diffusion_model
from configurator import parse_config, read_config_file, read_script_settings, run_cli
from diffusion_model import UNet, UNetConfig

# training's settings, read from the script as data: a recipe file names only its differences from them
TRAINING_DEFAULTS = read_script_settings(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_diffusion.py")
)

DEFAULTS = dict(
    configs="config/shapes_cpu.py,config/shapes_16px.py",
    steps=10,
    rounds=5,
    compile=True,
    bf16=False,
    threads=0,
    profile=False,
)
MODEL_KEYS = {f.name for f in dataclasses.fields(UNetConfig)}  # what a recipe file may say about the U-Net


@contextlib.contextmanager
def plain_autocast(on):
    """Undo the U-Net's two fp32 exceptions to CPU autocast while on: GroupNorm and attention then run in the
    dtype autocast gives them (bf16), as they would in a U-Net built from torch's own modules."""
    if not on:
        yield
        return
    saved = diffusion_model.GroupNorm32.forward, diffusion_model.attention
    diffusion_model.GroupNorm32.forward = torch.nn.GroupNorm.forward
    diffusion_model.attention = lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    try:
        yield
    finally:
        diffusion_model.GroupNorm32.forward, diffusion_model.attention = saved


def setup(cfg, batch_size, channels_last, compiled, bf16=False, plain=False):
    """(step function, seconds of the first step): the first step is where torch.compile compiles."""
    torch.manual_seed(0)
    model = UNet(cfg).train()
    x = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch_size,))
    context, mask = torch.randn(batch_size, 12, cfg.context_dim), torch.ones(batch_size, 12, dtype=torch.bool)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with plain_autocast(plain):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = run(x, t, context, mask)
            loss = F.mse_loss(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    t0 = time.time()
    step()
    first = time.time() - t0
    step()  # the backward graph of a compiled model is built on the first backward: warm both
    return step, first


def kernel_rates(seconds=1.0):
    """GFLOP/s of a 512 x 512 matmul and of the recipes' 3x3 convolution (64 channels, 16 x 16,
    channels_last, batch 32), in fp32 and bf16, interleaved: what bf16 can gain at most."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    feats = torch.randn(32, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    kernels = {
        "matmul 512": (lambda dt: lambda x=a.to(dt), y=b.to(dt): x @ y, 2 * 512**3),
        "conv3x3 64ch": (lambda dt: lambda m=conv.to(dt), x=feats.to(dt): m(x), 2 * 32 * 64 * 64 * 9 * 16 * 16),
    }
    with torch.no_grad():
        for name, (make, flops) in kernels.items():
            rates = {dt: [] for dt in (torch.float32, torch.bfloat16)}
            for _ in range(2):
                for dt in rates:
                    run = make(dt)
                    run()
                    t0, n = time.time(), 0
                    while time.time() - t0 < seconds / 2:
                        run()
                        n += 1
                    rates[dt].append(flops * n / (time.time() - t0) / 1e9)
            fp32, bf16 = max(rates[torch.float32]), max(rates[torch.bfloat16])
            print(f"{name}: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s, bf16/fp32 {bf16 / fp32:.2f}")


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.threads:
        torch.set_num_threads(C.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; {C.rounds} rounds x {C.steps} steps, medians")
    if C.bf16:
        kernel_rates()
    print("| config | setup | img/s | ratio to NCHW | first step (s) |")
    print("|---|---|---|---|---|")
    for path in C.configs.split(","):
        recipe = {**TRAINING_DEFAULTS, **read_config_file(path, TRAINING_DEFAULTS)}  # a recipe names its differences
        cfg = UNetConfig(context_dim=384, **{k: recipe[k] for k in MODEL_KEYS if k in recipe})
        B = recipe["batch_size"]
        # name: (channels_last, compiled, bf16 autocast, norms and attention in bf16 too)
        setups = {"NCHW": (False, False, False, False), "channels_last": (True, False, False, False)}
        if C.compile:
            setups["channels_last + compile"] = (True, True, False, False)
        if C.bf16:
            setups["channels_last + bf16 autocast (norms, attention fp32)"] = (True, False, True, False)
            setups["channels_last + plain bf16 autocast (norms, attention bf16)"] = (True, False, True, True)
        if C.compile and C.bf16:  # what train_diffusion.py runs with --compile=true where --dtype=auto picks bf16
            setups["channels_last + bf16 autocast (norms, attention fp32) + compile"] = (True, True, True, False)
        steps, firsts = {}, {}
        for name, flags in setups.items():
            steps[name], firsts[name] = setup(cfg, B, *flags)
        rates = {name: [] for name in setups}
        for _ in range(C.rounds):
            for name, step in steps.items():
                t0 = time.time()
                for _ in range(C.steps):
                    step()
                rates[name].append(C.steps * B / (time.time() - t0))
        base = statistics.median(rates["NCHW"])
        for name in setups:
            rate = statistics.median(rates[name])
            print(
                f"| {path} ({cfg.image_size} px, batch {B}) | {name} | {rate:.1f} | {rate / base:.2f} | "
                f"{firsts[name]:.1f} |",
                flush=True,
            )
        if C.profile:
            for name, flags in setups.items():
                if flags[2]:
                    print(f"\n{path}, {name}: the ops with the most time over 5 steps")
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        for _ in range(5):
                            steps[name]()
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
