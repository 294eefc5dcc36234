"""
Where a CUDA training step of our U-Net spends its time: the step time of a few variants of the
setup (memory layout, cudnn.benchmark, fp32/TF32 without autocast), then torch.profiler's
table of the ops that take the most GPU time in the baseline (what train_diffusion.py does on
CUDA: bf16 autocast, channels_last).

    python -m benchmarks.gpu_profile                                  # 64 px, batch 256, bench_unet's layout
    python -m benchmarks.gpu_profile --image_size=32 --batch_size=256 --rows=30

Keys (--key=value): image_size, batch_size, steps (timed steps per variant), rows (profiler rows),
device (auto|cuda|cpu; the CPU only checks the script), and the layout keys of bench_unet.py.
"""

import contextlib
import sys
import time

import torch

from benchmarks.bench_unet import make_batch, train_step
from configurator import parse_config, pick_device, run_cli
from diffusion_model import UNet, UNetConfig

DEFAULTS = dict(
    image_size=64,
    batch_size=256,
    steps=10,
    rows=25,
    device="auto",
    base_channels=64,
    channel_mults=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(1, 2),
    n_heads=4,
    context_dim=384,
)
VARIANTS = [  # name, channels_last, cudnn.benchmark, fp32 (TF32) without autocast
    ("baseline: autocast bf16, channels_last", True, False, False),
    ("autocast bf16, contiguous (NCHW)", False, False, False),
    ("autocast bf16, channels_last, cudnn.benchmark", True, True, False),
    ("fp32 (TF32), no autocast, channels_last", True, False, True),
]


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    device = pick_device(C.device)
    cuda = device.type == "cuda"
    cfg = UNetConfig(
        image_size=C.image_size,
        base_channels=C.base_channels,
        channel_mults=C.channel_mults,
        num_res_blocks=C.num_res_blocks,
        attention_levels=C.attention_levels,
        n_heads=C.n_heads,
        context_dim=C.context_dim,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"{torch.cuda.get_device_name(device) if cuda else 'cpu'} | torch {torch.__version__} | "
        f"{C.image_size}px, batch {C.batch_size}, {C.steps} timed steps per variant"
    )

    def setup(channels_last, fp32):
        torch.manual_seed(0)
        model = UNet(cfg).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        batch = make_batch(cfg, C.batch_size, 16, device, channels_last=channels_last)
        autocast = contextlib.nullcontext() if fp32 or not cuda else torch.autocast("cuda", dtype=torch.bfloat16)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), batch, autocast

    for name, channels_last, benchmark, fp32 in VARIANTS:
        torch.backends.cudnn.benchmark = benchmark
        model, opt, batch, autocast = setup(channels_last, fp32)
        for _ in range(3):
            train_step("ours", model, opt, batch, autocast)
        sync()
        t0 = time.perf_counter()
        for _ in range(C.steps):
            train_step("ours", model, opt, batch, autocast)
        sync()
        ms = (time.perf_counter() - t0) / C.steps * 1e3
        print(f"{name}: {ms:.1f} ms/step, {C.batch_size / ms * 1e3:.0f} img/s", flush=True)
        del model, opt, batch

    torch.backends.cudnn.benchmark = False
    model, opt, batch, autocast = setup(True, False)
    for _ in range(3):
        train_step("ours", model, opt, batch, autocast)
    sync()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            train_step("ours", model, opt, batch, autocast)
        sync()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nbaseline, 3 steps under torch.profiler, ops by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=C.rows, max_name_column_width=60))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
