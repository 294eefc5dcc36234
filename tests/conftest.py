"""Shared fixtures. Tests never touch the network: the Hub is offline, W&B writes local runs.
The repository root is on the import path through pytest.ini (pythonpath = .).

The suite means the same on every machine: no GPU is visible to the tests or their subprocesses
(CUDA_VISIBLE_DEVICES is empty, set before torch looks), and the tiny runs name their device and
their config file, so that `auto` never picks a GPU (or Apple's mps) and the CPU recipe is never
merged in behind their back."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by every subprocess (torchrun, kill -9, the CLI tests)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_run.py")
# A tiny offline run on the CPU: shapes, packaged MiniLM, 16 px, 256 images, a 2-level U-Net of base 32 on
# 2x2 patches (tests/tiny_run.py holds the settings not written here).
TINY = [
    TINY_CONFIG,
    "--device=cpu",
    "--dataset=shapes",
    "--text_encoder=minilm",
    "--shapes_num_images=256",
    "--image_size=16",
    "--base_channels=32",
    "--channel_mults=1,2",
    "--num_res_blocks=1",
    "--attention_levels=1",
    "--n_heads=2",
    "--batch_size=16",
    "--wandb_mode=disabled",
    "--steps=3",
    "--eval_images=32",
    "--warmup_steps=5",
    "--lr=1e-3",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model from scratch for minutes (deselect with -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def no_apple_gpu():
    """What CUDA_VISIBLE_DEVICES does for CUDA, for Apple's GPU in the tests' own process: `auto` never
    picks mps on a Mac (the runs the tests start name --device=cpu). Tests of mps patch it back.
    (configurator's probe, not torch.backends.mps.is_available: torch._dynamo reads that one's __wrapped__.)"""
    import configurator

    patch = pytest.MonkeyPatch()
    patch.setattr(configurator, "mps_available", lambda: False)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def one_thread():
    """On a shared 2-core machine two intra-op threads keep waiting on each other: these tiny models
    train 10-100x faster on one (torch here, OMP_NUM_THREADS for the scripts the tests start)."""
    import torch  # here, not at the top: CUDA_VISIBLE_DEVICES is set before torch is imported

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # run_script passes os.environ on
    yield
    torch.set_num_threads(threads)
    if omp is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="session")
def root():
    """The repository's root folder (scripts run from there)."""
    return ROOT


@pytest.fixture(scope="session")
def tiny():
    """Arguments of a tiny offline training run; add --max_steps and --out_dir."""
    return list(TINY)


@pytest.fixture(scope="session")
def small(tiny):
    """small(**over): the tiny run with 64 images, batch 4, a log line every step and no
    evaluation after step 0, any key overridden, as --key=value arguments."""

    def make(**over):
        files = [a for a in tiny if not a.startswith("--")]
        cfg = dict(a[2:].split("=", 1) for a in tiny if a.startswith("--"))
        cfg.update(shapes_num_images=64, batch_size=4, log_interval=1, eval_interval=1000, sample_interval=1000)
        cfg.update(over)
        return files + [f"--{k}={v}" for k, v in cfg.items()]

    return make


@pytest.fixture(scope="session")
def read_log():
    """read_log(run_dir): the run's log.jsonl as a list of dicts."""

    def read(run_dir):
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f]

    return read


@pytest.fixture(scope="session")
def run_script():
    """run_script(args, timeout): run `python <args>` from the root, offline, and capture its output."""

    def run(args, timeout=300, **kw):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw
        )

    return run


@pytest.fixture(scope="session")
def train_in_process():
    """train_in_process(argv): train_diffusion.main in this process, pytest's signal handlers kept."""
    import train_diffusion

    def train(argv):
        saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        try:
            return train_diffusion.main(argv)
        finally:
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])

    return train


def _gloo_rank(rank, init_file, results, fn):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = fn(SimpleNamespace(ddp=True, rank=rank, world=2, master=rank == 0, device=torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def two_ranks():
    """two_ranks(fn): fn(sysinfo) in two processes joined by gloo on the CPU, as torchrun would
    join them; returns {rank: what fn returned}. fn must be a module-level function (or a partial)."""

    def run(fn):
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            results = mp.Manager().dict()
            mp.spawn(_gloo_rank, args=(os.path.join(d, "init"), results, fn), nprocs=2)
            return dict(results)

    return run


def user_error(fn, *args):
    """Run fn(*args), expect a UserError, check that it is one line, return its text."""
    import configurator

    with pytest.raises(configurator.UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


def the_error_line(stderr):
    """The one `error:` line of a script that exited with code 2 (tqdm bars share stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]
