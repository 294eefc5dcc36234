"""
Training-step speed of a recipe's U-Net on this machine, by memory layout and torch.compile: the two
CPU levers of the 32 px recipe that change no result, only the seconds (README, the 32 px recipe).

    python -m benchmarks.bench_layout  # config/shapes_cpu.py and config/shapes_16px.py
    python -m benchmarks.bench_layout --configs=config/shapes_cpu.py --compile=false --rounds=3

For each config file: its U-Net (MiniLM's 384-d tokens, 12 of them), AdamW, one fixed batch of the
recipe's batch_size, forward + v-loss-shaped MSE + backward + step, as train_diffusion.py runs it.
Setups are timed in turn (NCHW, channels_last, compiled, NCHW, ...) for --rounds rounds of --steps
steps each, so that a slow spell of the machine hits all of them; the table shows the median
images/s, its ratio to NCHW, and for torch.compile the seconds its first steps took to compile: it
pays back only in a run where (1 - 1/ratio) x the run's training seconds exceed that.
"""

import dataclasses
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from configurator import parse_config, read_config_file, run_cli
from diffusion_model import UNet, UNetConfig
from train_diffusion import DEFAULTS as TRAINING_DEFAULTS

DEFAULTS = dict(configs="config/shapes_cpu.py,config/shapes_16px.py", steps=10, rounds=5, compile=True, threads=0)
MODEL_KEYS = {f.name for f in dataclasses.fields(UNetConfig)}  # what a recipe file may say about the U-Net


def setup(cfg, batch_size, channels_last, compiled):
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
        loss = F.mse_loss(run(x, t, context, mask), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t0 = time.time()
    step()
    first = time.time() - t0
    step()  # the backward graph of a compiled model is built on the first backward: warm both
    return step, first


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.threads:
        torch.set_num_threads(C.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; {C.rounds} rounds x {C.steps} steps, medians")
    print("| config | setup | img/s | ratio to NCHW | first step (s) |")
    print("|---|---|---|---|---|")
    for path in C.configs.split(","):
        recipe = {**TRAINING_DEFAULTS, **read_config_file(path, TRAINING_DEFAULTS)}  # a recipe names its differences
        cfg = UNetConfig(context_dim=384, **{k: recipe[k] for k in MODEL_KEYS if k in recipe})
        B = recipe["batch_size"]
        setups = {"NCHW": (False, False), "channels_last": (True, False)}
        if C.compile:
            setups["channels_last + compile"] = (True, True)
        steps, firsts = {}, {}
        for name, (cl, comp) in setups.items():
            steps[name], firsts[name] = setup(cfg, B, cl, comp)
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


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
