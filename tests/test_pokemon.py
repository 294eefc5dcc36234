"""The repo's subject, measured: a short slice of the CPU Pokémon recipe (config/pokemon_cpu.py) on
the shared Pokémon art must move the in-training KID far below the untrained model's. Skips where
../shared/data/pokedex-art is absent (a fresh clone) or the metric's packages are not installed."""

import os

import pytest

import image_quality

ART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "pokedex-art")
TEST_STEPS = 400


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(ART), reason="no ../shared/data/pokedex-art here (a fresh clone)")
@pytest.mark.skipif(not image_quality.available(), reason=f"metric packages missing: {image_quality.INSTALL_HINT}")
def test_pokemon_recipe_slice_lowers_kid_far_below_the_untrained_model(train_in_process, read_log, tmp_path):
    run_dir = train_in_process(
        [
            "config/pokemon_cpu.py",
            "--device=cpu",
            f"--dataset={ART}",
            "--wandb_mode=disabled",
            f"--max_steps={TEST_STEPS}",
            f"--eval_interval={TEST_STEPS}",
            "--sample_interval=100000",
            "--ckpt_interval=100000",
            f"--out_dir={tmp_path}",
        ]
    )
    kid = {r["step"]: r["quality/kid"] for r in read_log(run_dir) if "quality/kid" in r}
    print(f"KID x1000 against held-out art: {kid}")
    assert sorted(kid) == [0, TEST_STEPS]
    assert kid[TEST_STEPS] < 0.5 * kid[0], kid
