"""torchrun with 2 CPU processes (gloo) runs the same train_diffusion.py as one process."""

import functools
import glob
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import distributed
import train_diffusion as td


@pytest.fixture(scope="session")
def ddp_args(tiny):
    return [a for a in tiny if not a.startswith("--batch_size")] + [
        "--max_steps=12",
        "--log_interval=1",
        "--eval_interval=1000",
        "--sample_interval=1000",
        "--ckpt_interval=6",
        "--dropout=0.1",
    ]  # the GPU recipe's


@pytest.fixture(scope="session")
def torchrun(root):
    """torchrun(args, nproc): train_diffusion.py under torch.distributed.run on nproc CPU processes (gloo)."""

    def run(args, nproc=2, timeout=400):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "train_diffusion.py",
            *args,
        ]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, torchrun, ddp_args):
    """Two ranks with the GPU recipe's dropout 0.1: each rank draws its own dropout masks, which DDP's
    averaged gradients must still keep in lockstep (and which resuming must give back per rank)."""
    out = tmp_path_factory.mktemp("ddp")
    r = torchrun(ddp_args + ["--batch_size=8", "--wandb_mode=offline", f"--out_dir={out}"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, r


def test_ddp_run_finishes_with_identical_replicas_and_one_writer(read_log, ddp_run):
    out, r = ddp_run
    assert "distributed: 2 ranks, global batch 16" in r.stdout
    assert "all 2 ranks hold identical weights" in r.stdout
    runs = glob.glob(str(out / "*"))
    assert len(runs) == 1, runs  # one run folder: only rank 0 writes
    assert glob.glob(os.path.join(runs[0], "*.pt")) == [os.path.join(runs[0], "ckpt.pt")]
    assert len(glob.glob(os.path.join(runs[0], "wandb", "offline-run-*"))) == 1  # one W&B run
    steps = [r["step"] for r in read_log(runs[0]) if "train/loss" in r]
    assert steps == list(range(1, 13))  # each step logged once, not once per rank


def test_ddp_loss_matches_one_process_with_the_same_global_batch(read_log, torchrun, ddp_args, tmp_path):
    """Without dropout two ranks of 8 compute what one process of 16 does: the same images, timesteps,
    noise and caption dropout, drawn for the global batch. With dropout > 0 each rank draws its own
    masks, so the runs agree in distribution only (ddp_run trains with ddp_args' 0.1)."""
    r = torchrun(ddp_args + ["--dropout=0", "--batch_size=8", "--wandb_mode=disabled", f"--out_dir={tmp_path / 'ddp'}"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ddp = {r["step"]: r["train/loss"] for r in read_log(glob.glob(str(tmp_path / "ddp" / "*"))[0]) if "train/loss" in r}
    single_dir = td.main(
        ddp_args + ["--dropout=0", "--batch_size=16", "--wandb_mode=disabled", f"--out_dir={tmp_path / 'one'}"]
    )
    single = {r["step"]: r["train/loss"] for r in read_log(single_dir) if "train/loss" in r}
    assert single.keys() == ddp.keys()
    for k in single:
        assert abs(single[k] - ddp[k]) < 1e-3 * max(1.0, single[k]), (k, single[k], ddp[k])


def test_ddp_checkpoint_resumes_under_torchrun_and_samples_unchanged(root, ddp_run, ddp_args, torchrun, tmp_path):
    out, _ = ddp_run
    (run_dir,) = glob.glob(str(out / "*"))
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert not any(k.startswith("module.") for k in ckpt["model"])  # loads into a plain U-Net
    checkpoints.build_model(ckpt)
    r = torchrun(
        ddp_args + ["--batch_size=8", "--wandb_mode=disabled", "--max_steps=14", "--resume=auto", f"--out_dir={out}"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"] == 14
    s = subprocess.run(
        [
            sys.executable,
            "sample_diffusion.py",
            f"--checkpoint={run_dir}",
            "--sampler=ddim",
            "--steps=2",
            "--num_images=1",
            f"--out_dir={tmp_path}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert s.returncode == 0, s.stderr[-2000:]
    assert os.path.isfile(tmp_path / "generated_image_pokemon_cfg.png")


def _replicas(sysinfo, perturb):
    torch.manual_seed(0)  # the same weights on both ranks, as DDP's broadcast leaves them
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        if perturb == "nudge" and sysinfo.rank == 1:
            model.weight[0, 0] += 1e-6
        if perturb == "swap" and sysinfo.rank == 1:  # the same sum, other positions
            model.weight[0, 0], model.weight[1, 1] = model.weight[1, 1].item(), model.weight[0, 0].item()
    try:
        distributed.check_replicas_identical(sysinfo, model)
    except distributed.ReplicasDiverged:
        return "diverged"
    return "identical"


@pytest.mark.parametrize("perturb, expected", [(None, "identical"), ("nudge", "diverged"), ("swap", "diverged")])
def test_check_replicas_identical_raises_on_every_rank_when_one_differs(two_ranks, perturb, expected):
    assert two_ranks(functools.partial(_replicas, perturb=perturb)) == {0: expected, 1: expected}
