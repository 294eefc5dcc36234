"""sample_diffusion.py: the two files, determinism, the trajectory strip, and its errors."""

import hashlib
import os

import pytest
import torch

import configurator
import sample_diffusion as sd
import train_diffusion as td


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return td.main(tiny + ["--max_steps=10", "--eval_interval=1000", f"--out_dir={out}"])


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_writes_both_files_grids_and_singles(run_dir, tmp_path, capsys):
    sd.main([f"--checkpoint={run_dir}", "--sampler=ddim", "--steps=3", "--num_images=2", f"--out_dir={tmp_path}"])
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "generated_image_pokemon.png",
        "generated_image_pokemon_000.png",
        "generated_image_pokemon_001.png",
        "generated_image_pokemon_cfg.png",
        "generated_image_pokemon_cfg_000.png",
        "generated_image_pokemon_cfg_001.png",
    ]
    from PIL import Image

    grid, single = (
        Image.open(tmp_path / "generated_image_pokemon_cfg.png"),
        Image.open(tmp_path / "generated_image_pokemon_000.png"),
    )
    assert single.size == (16, 16)  # one image: no frame
    assert grid.width == 2 * 16 + 3 * 2 and grid.height == 16 + 4
    assert "text encoder minilm" in capsys.readouterr().out  # the checkpoint's encoder, named


def test_same_seed_gives_byte_identical_pngs_and_another_seed_does_not(run_dir, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        sd.main(
            [
                f"--checkpoint={run_dir}",
                "--sampler=ddim",  # stochastic (eta 1) as DDPM is: fresh noise at every step, 50 steps not 1000
                "--eta=1",
                "--steps=50",
                f"--seed={seed}",
                "--num_images=1",
                f"--out_dir={tmp_path / name}",
            ]
        )
    for f in ("generated_image_pokemon.png", "generated_image_pokemon_cfg.png"):
        assert sha(tmp_path / "a" / f) == sha(tmp_path / "b" / f)
        assert sha(tmp_path / "a" / f) != sha(tmp_path / "c" / f)


def test_trajectory_strip(run_dir, tmp_path):
    sd.main(
        [
            f"--checkpoint={run_dir}",
            "--sampler=ddim",
            "--steps=10",
            "--num_images=1",
            "--save_trajectory=true",
            f"--out_dir={tmp_path}",
        ]
    )
    from PIL import Image

    strip = Image.open(tmp_path / "generated_image_pokemon_trajectory.png")
    assert strip.size == (8 * 16 + 9 * 2, 2 * 16 + 3 * 2)  # 8 steps; x_t above, predicted x0 below


def test_empty_prompt_is_unconditional_and_long_prompt_warns(run_dir, tmp_path, capsys):
    sd.main(
        [
            f"--checkpoint={run_dir}",
            "--sampler=ddim",
            "--steps=2",
            "--num_images=1",
            "--condition=",
            f"--out_dir={tmp_path}",
        ]
    )
    assert "unconditional prompt" in capsys.readouterr().out
    sd.main(
        [
            f"--checkpoint={run_dir}",
            "--sampler=ddim",
            "--steps=2",
            "--num_images=1",
            "--condition=" + "red " * 100,
            f"--out_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert err.count("longer than 77 tokens") == 1


def test_a_sampler_setting_without_effect_is_one_warning_before_the_images(run_dir, tmp_path, capsys):
    args = ["--sampler=dpmpp_2m", "--steps=3", "--eta=0.5", "--num_images=1", f"--out_dir={tmp_path}"]
    sd.main([f"--checkpoint={run_dir}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "warning: --eta has no effect: dpmpp_2m is deterministic", err
    assert (tmp_path / "generated_image_pokemon_cfg.png").exists()


def test_focus_changes_only_the_guided_image_and_is_named(run_dir, tmp_path, capsys):
    """The plain image has no guidance of any kind, so a focus leaves it byte-identical; the _cfg one moves."""
    common = [f"--checkpoint={run_dir}", "--sampler=ddim", "--steps=3", "--num_images=1", "--guidance_scale=2"]
    sd.main([*common, f"--out_dir={tmp_path / 'plain'}"])
    sd.main([*common, "--focus=a small blue square", "--focus_scale=3", f"--out_dir={tmp_path / 'focus'}"])
    assert "focus 'a small blue square' at 3" in capsys.readouterr().out
    plain, cfg = "generated_image_pokemon.png", "generated_image_pokemon_cfg.png"
    assert sha(tmp_path / "plain" / plain) == sha(tmp_path / "focus" / plain)
    assert sha(tmp_path / "plain" / cfg) != sha(tmp_path / "focus" / cfg)
    sd.main([*common, "--focus=red", f"--out_dir={tmp_path / 'unused'}"])
    assert "warning: --focus has no effect: focus_scale is 0" in capsys.readouterr().err
    assert sha(tmp_path / "plain" / cfg) == sha(tmp_path / "unused" / cfg)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--sampler=euler"], "--sampler=euler is out of range: use one of ddpm, ddim"),
        (["--guidance_scale=-1"], "--guidance_scale=-1.0 is out of range: use a finite number in [0, 100]"),
        (["--sampler=ddim", "--steps=0"], "--steps=0 is out of range"),
        (["--sampler=ddim", "--steps=1001"], "--steps=1001 is out of range: DDIM takes 1 to 1000 steps"),
        (["--sampler=dpmpp_2m", "--steps=1001"], "--steps=1001 is out of range: DPM-Solver++(2M) takes 1 to 1000"),
        (["--seed=x"], "--seed=x: expected an integer"),
        (
            ["--focus_scale=1"],
            '--focus_scale=1 needs a focus: pass the part of the prompt to weigh more, e.g. --focus="',
        ),
        (["--focus=red", "--focus_scale=-1"], "--focus_scale=-1.0 is out of range"),
    ],
)
def test_bad_settings_are_one_line_errors(run_dir, tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        configurator.run_cli(sd.main, [f"--checkpoint={run_dir}", f"--out_dir={tmp_path}", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_bad_checkpoints_are_one_line_errors(run_script, run_dir, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    other = tmp_path / "other.pt"
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)
    ckpt["model_args"]["base_channels"] = 64  # the tensors no longer fit
    torch.save(ckpt, other)
    for path, expected in (
        (tmp_path / "missing", "no checkpoint in"),
        (junk, "is not a checkpoint written by torch.save"),
        (other, "do not fit its model_args"),
    ):
        r = run_script(["sample_diffusion.py", f"--checkpoint={path}", f"--out_dir={tmp_path}"], timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], r.stderr


def test_bench_sampling_runs_ddim_at_each_eta_and_ddpm_and_dpmpp_once(run_dir, tmp_path):
    import benchmarks.bench_sampling as bs
    from diffusion_model import SamplerConfig

    assert bs.parse_samplers("ddpm,ddim5,dpmpp3", 1000, (0.0, 1.0)) == [
        SamplerConfig("ddpm"),
        SamplerConfig("ddim", 5, 0.0),
        SamplerConfig("ddim", 5, 1.0),
        SamplerConfig("dpmpp_2m", 3),
    ]
    for bad in ("ddim0", "dpmpp", "euler5"):
        with pytest.raises(configurator.UserError, match=bad):
            bs.parse_samplers(bad, 1000)
    table = tmp_path / "t.tsv"
    args = ["--samplers=ddim2,dpmpp3", "--etas=0,1", "--guidance_scale=1", "--repeats=1", "--device=cpu"]
    rows = bs.main([f"--checkpoint={run_dir}", f"--table={table}", *args])
    # w = 1: one evaluation a step for each of the 27 prompts
    assert [(r["sampler"], r["steps"], r["evals"]) for r in rows] == [
        ("ddim2 eta=0", 2, 2.0),
        ("ddim2 eta=1", 2, 2.0),
        ("dpmpp3", 3, 3.0),
    ]
    assert len(table.read_text().splitlines()) == 4
