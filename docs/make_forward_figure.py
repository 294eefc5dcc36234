"""
Make docs/forward_process.png: q(x_t | x_0) of the cosine schedule at several t, for a few
images of the shapes dataset, with the repo's own NoiseScheduler.

    python -m docs.make_forward_figure
"""

import os

import torch

import shapes
from diffusion_model import NoiseScheduler
from image_data import save_grid

TIMESTEPS = [0, 50, 150, 300, 500, 700, 850, 999]

if __name__ == "__main__":
    images, captions, _ = shapes.make_shapes_dataset(4, image_size=64, seed=3)
    x0 = images.float() / 127.5 - 1  # (4, 3, 64, 64)
    scheduler = NoiseScheduler(1000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = [scheduler.q_sample(x0, torch.full((4,), t), noise) for t in TIMESTEPS]  # same noise at every t
    grid = torch.stack(rows, dim=1).flatten(0, 1)  # (4 * len(TIMESTEPS), 3, 64, 64), one row per image
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forward_process.png")
    save_grid(grid.clamp(-1, 1), out, nrow=len(TIMESTEPS))
    abar = scheduler.alphas_cumprod
    print(
        f"wrote {out}: columns t = {TIMESTEPS}, sqrt(abar_t) = {[round(abar[t].sqrt().item(), 3) for t in TIMESTEPS]}"
    )
    print("rows:", captions)
