"""
One figure of a run on an image dataset: what it drew for its 8 fixed held-out captions over
training, above the real art of those captions.

    python docs/make_sample_grid.py diffusion_results/<run> --dataset=../shared/data/pokedex-art \
        --out docs/pokemon_grid.png

Rows, top to bottom: an untrained U-Net of the run's layout (step 0), the grids the run saved
(samples_<step>.png, EMA weights, the recipe's sampler and guidance), then the held-out art itself,
split out of the folder as train_diffusion.py split it (the run's seed, val_fraction, eval_images).
"""

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints import build_scheduler, load_checkpoint  # noqa: E402
from diffusion_model import SamplerConfig, UNet, UNetConfig, image_generators, sample  # noqa: E402
from image_data import load_art, save_grid  # noqa: E402
from text_encoders import TextEncoder, embed_prompts  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--scale", type=int, default=1, help="enlarge the figure this many times (nearest neighbour)")
    args = parser.parse_args()
    from torchvision.io import read_image

    ckpt = load_checkpoint(os.path.join(args.run, "ckpt.pt"))
    C = ckpt["config"]
    _, _, held, cap_held = load_art(
        args.dataset, ckpt["model_args"]["image_size"], C["seed"], C["val_fraction"], C["eval_images"]
    )
    held, captions = held[:8], cap_held[:8]
    torch.manual_seed(C["seed"])
    untrained = UNet(UNetConfig(**ckpt["model_args"])).eval()
    cond, uncond = embed_prompts(TextEncoder(ckpt["text_encoder"]), captions, torch.device("cpu"))
    gens = image_generators(C["seed"], len(captions))  # training's grid noise
    rows = [
        sample(
            untrained, build_scheduler(ckpt), cond, uncond, SamplerConfig.from_settings(argparse.Namespace(**C)), gens
        )
    ]
    size = held.shape[-1]
    for path in sorted(glob.glob(os.path.join(args.run, "samples_*.png"))):
        grid = read_image(path)[:3].float() / 127.5 - 1  # one row of 8, 2 px padding between and around
        rows.append(
            torch.stack([grid[:, 2 : 2 + size, 2 + i * (size + 2) : 2 + i * (size + 2) + size] for i in range(8)])
        )
        print(f"row {len(rows)}: {os.path.basename(path)}")
    rows.append(held.float() / 127.5 - 1)
    out = args.out or os.path.join(args.run, "grid_over_training.png")
    save_grid(torch.cat(rows), out)
    if args.scale > 1:
        from PIL import Image

        with Image.open(out) as img:
            img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST).save(out)
    print(f"wrote {out}; columns are these held-out captions:")
    for c in captions:
        print(f"- {c}")


if __name__ == "__main__":
    main()
