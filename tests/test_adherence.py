"""The claim of the repo, measured: a model trained from scratch on shapes draws what it is told,
color and position included, with the fast deterministic sampler, and classifier-free guidance is
what makes it do so. Minutes of CPU: deselect locally with `-m "not slow"`; CI runs it."""

import os

import pytest
import torch

import checkpoints
import shapes
import text_encoders
from diffusion_model import SamplerConfig

# the 16 px CPU recipe (the quick one), shortened to fit a test (README, "Results": position reaches 1.00 on the
# in-training judge by step 1000 of the recipe)
RECIPE = [
    "config/shapes_16px.py",
    "--wandb_mode=disabled",
    "--eval_interval=100000",
    "--sample_interval=100000",
    "--ckpt_interval=100000",
]
TEST_STEPS = 1000
DDIM25 = SamplerConfig("ddim", steps=25, eta=0.0)


@pytest.mark.slow
def test_trained_model_follows_color_and_position_and_cfg_beats_no_guidance(train_in_process, tmp_path):
    run_dir = train_in_process(RECIPE + [f"--max_steps={TEST_STEPS}", f"--out_dir={tmp_path}"])
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    model = checkpoints.build_model(ckpt, "ema").eval()
    scheduler = checkpoints.build_scheduler(ckpt)
    prompts = shapes.eval_prompts()
    cond, uncond = text_encoders.embed_prompts(
        text_encoders.TextEncoder("minilm"), [p["caption"] for p in prompts], torch.device("cpu")
    )
    score = {0.0: dict(color=0.0, position=0.0), 3.0: dict(color=0.0, position=0.0)}
    for seed in (0, 1):  # two seeds x 27 prompts (seen and held-out pairs), deterministic DDIM-25
        res = shapes.sample_adherence(model, scheduler, prompts, cond, uncond, DDIM25, (0.0, 3.0), seed)
        n_seen, n_held = sum(not p["held_out"] for p in prompts), sum(p["held_out"] for p in prompts)
        for w in score:
            for a in score[w]:
                score[w][a] += (res[w]["seen"][a] * n_seen + res[w]["held_out"][a] * n_held) / len(prompts) / 2
    print(f"adherence after {TEST_STEPS} steps, DDIM-25 eta=0: w=0 {score[0.0]}, w=3 {score[3.0]}")
    assert score[3.0]["color"] >= 0.9, score
    assert score[3.0]["position"] >= 0.8, score
    assert score[3.0]["color"] - score[0.0]["color"] >= 0.3, score
