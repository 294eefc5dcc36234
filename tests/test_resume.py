"""`--resume=auto` continues the run it resumes: its settings, its end, its randomness; a finished
run stays finished. In process (train_in_process), on tiny shapes runs."""

import hashlib
import os
import signal
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import configurator
import distributed
import evaluation
import image_data
import train_diffusion as td

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine

# A custom run: every setting that differs from the CPU recipe must come back from the checkpoint.
# Dropout makes the step depend on the CPU RNG state, which must be restored too.
CUSTOM = [
    "--lr=5e-4",
    "--min_lr=5e-5",
    "--batch_size=8",
    "--dropout=0.1",
    "--p_uncond=0.2",
    "--ema_decay=0.99",
    "--max_steps=16",
    "--log_interval=1",
    "--ckpt_interval=1000",
    "--eval_interval=1000",
    "--sample_interval=1000",
]


def stop_at(monkeypatch, k):
    """Press Ctrl-C (a real SIGINT to this process) during step k - 1: the loop stops at step k.
    Returns a list that holds the step once the signal was sent."""
    real, sent = td.stop_requested, []

    def check(sysinfo, sig, step, every):
        if step == k - 1:
            os.kill(os.getpid(), signal.SIGINT)
            sent.append(step)
        return real(sysinfo, sig, step, every)

    monkeypatch.setattr(td, "stop_requested", check)
    return sent


def tree_digest(folder):
    """Every file's path and bytes, hashed: equal digests mean no byte of the folder changed."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tiny, train_in_process, read_log, tmp_path_factory):
    run_dir = train_in_process(tiny + CUSTOM + [f"--out_dir={tmp_path_factory.mktemp('ref')}"])
    return run_dir, {r["step"]: r["train/loss"] for r in read_log(run_dir) if "train/loss" in r}


def test_bare_resume_reproduces_the_uninterrupted_custom_run(
    tiny, train_in_process, read_log, uninterrupted, tmp_path, monkeypatch
):
    ref_dir, ref = uninterrupted
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_at(m, 7)
        with pytest.raises(SystemExit) as e:
            train_in_process(tiny + CUSTOM + [f"--out_dir={out}"])
    assert e.value.code == 128 + signal.SIGINT
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    assert checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"] == 7

    train_in_process(["--resume=auto", f"--out_dir={out}"])  # nothing retyped
    resumed = {r["step"]: r["train/loss"] for r in read_log(run_dir) if "train/loss" in r}
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == ref  # the same losses to the last bit: same settings, data, noise and dropout draws
    a = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    b = checkpoints.load_checkpoint(os.path.join(ref_dir, "ckpt.pt"))
    assert a["step"] == b["step"] == 16
    for part in ("model", "ema"):
        for name in b[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    assert a["config"]["lr"] == 5e-4 and a["config"]["batch_size"] == 8 and "lr_schedule" not in a


class Killed(BaseException):
    """The scheduler's SIGKILL after its grace period, simulated: nothing catches it."""


@pytest.mark.parametrize(
    "where, busy", [(evaluation.Evaluator, "__call__"), (evaluation, "save_grid")], ids=["evaluate", "save_grid"]
)
def test_a_stop_signal_on_an_evaluation_step_saves_before_evaluating(
    tiny, train_in_process, tmp_path, monkeypatch, where, busy
):
    """The signal lands on step 6, an evaluation and sample-grid step: the checkpoint of step 6 is
    written before any evaluation or grid, so a kill that comes while one runs loses nothing."""
    sent = stop_at(monkeypatch, 6)
    real = getattr(where, busy)
    monkeypatch.setattr(where, busy, lambda *a, **k: (_ for _ in ()).throw(Killed()) if sent else real(*a, **k))
    with pytest.raises((SystemExit, Killed)):
        train_in_process(tiny + ["--max_steps=20", "--eval_interval=3", "--sample_interval=3", f"--out_dir={tmp_path}"])
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"] == 6


def test_a_finished_run_is_left_untouched(uninterrupted, train_in_process, tmp_path, capsys):
    import shutil

    ref_dir, _ = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(ref_dir, out / "run")
    before = tree_digest(out)
    assert train_in_process(["--resume=auto", f"--out_dir={out}"]) == str(out / "run")
    assert tree_digest(out) == before
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "finished at step 16 (max_steps 16); nothing to do" in line and "--max_steps" in line


def test_raising_max_steps_continues_and_other_explicit_changes_are_printed(
    uninterrupted, train_in_process, read_log, tmp_path, capsys
):
    import shutil

    ref_dir, _ = uninterrupted
    shutil.copytree(ref_dir, tmp_path / "out" / "run")
    run_dir = train_in_process(["--resume=auto", f"--out_dir={tmp_path / 'out'}", "--max_steps=20", "--lr=1e-4"])
    out = capsys.readouterr().out
    assert "resuming with max_steps 20 instead of 16" in out and "resuming with lr 0.0001 instead of 0.0005" in out
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["step"] == 20 and ckpt["config"]["lr"] == 1e-4 and ckpt["config"]["batch_size"] == 8
    logged = [r for r in read_log(run_dir) if "train/lr" in r]
    assert [r["step"] for r in logged][-4:] == [17, 18, 19, 20]
    # the cosine stretches to the new end: the lr of step 16 is the stretched schedule's, not min_lr
    C = SimpleNamespace(**ckpt["config"])
    assert logged[-4]["train/lr"] == pytest.approx(td.lr_at(16, C)) and td.lr_at(16, C) > C.min_lr


def copied_run(uninterrupted, tmp_path):
    """A copy of the uninterrupted run (16 of 16 steps) as the only run of out_dir: (out_dir, its ckpt.pt)."""
    import shutil

    shutil.copytree(uninterrupted[0], tmp_path / "out" / "run")
    return tmp_path / "out", tmp_path / "out" / "run" / "ckpt.pt"


def assert_refused_untouched(train_in_process, argv, ckpt_path, expected):
    """Resuming with argv is one line naming `expected`; the checkpoint is unchanged and no lock is left."""
    before = ckpt_path.read_bytes()
    with pytest.raises(configurator.UserError) as e:
        train_in_process(argv)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert ckpt_path.read_bytes() == before and not (ckpt_path.parent / "run.lock").exists()


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--base_channels=64", "--base_channels=64 differs from the resumed run's 32"),
        # the validation split: another value would move trained-on images into validation
        ("--eval_images=16", "--eval_images=16 differs from the resumed run's 32"),
        ("--val_fraction=0.1", "--val_fraction=0.1 differs from the resumed run's 0.05"),
    ],
)
def test_identity_keys_cannot_change_on_resume(uninterrupted, train_in_process, tmp_path, arg, expected):
    out, ckpt = copied_run(uninterrupted, tmp_path)
    assert_refused_untouched(
        train_in_process, ["--resume=auto", f"--out_dir={out}", arg, "--max_steps=20"], ckpt, expected
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda c: c["model_args"].update(pos_embed=False),
            "weights are a U-Net with pos_embed=False but its settings say True",
        ),
        (
            lambda c: c["model_args"].update(patch_size=1),
            "weights are a U-Net with patch_size=1 but its settings say 2",
        ),
        (lambda c: c.pop("ema"), "holds no ema: it cannot be resumed exactly"),
        (lambda c: [c.pop("optimizer"), c.pop("rng")], "holds no optimizer, rng: it cannot be resumed exactly"),
    ],
    ids=["pos_embed", "patch_size", "no_ema", "no_optimizer_rng"],
)
def test_a_checkpoint_that_does_not_fit_its_settings_is_one_line(
    uninterrupted, train_in_process, tmp_path, edit, expected
):
    out, ckpt_path = copied_run(uninterrupted, tmp_path)
    ckpt = checkpoints.load_checkpoint(str(ckpt_path))
    edit(ckpt)
    checkpoints.save_checkpoint(str(ckpt_path), ckpt)
    assert_refused_untouched(
        train_in_process, ["--resume=auto", f"--out_dir={out}", "--max_steps=20"], ckpt_path, expected
    )


def test_a_run_saved_before_the_dtype_setting_resumes_with_this_machines_precision(
    uninterrupted, train_in_process, read_log, tmp_path
):
    """dtype, like device, belongs to the machine that resumes: a checkpoint written before the setting
    existed resumes (it was refused as "another version"), and a stored dtype is not forced on this one."""
    out, ckpt_path = copied_run(uninterrupted, tmp_path)
    ckpt = checkpoints.load_checkpoint(str(ckpt_path))
    del ckpt["config"]["dtype"]
    checkpoints.save_checkpoint(str(ckpt_path), ckpt)
    train_in_process(["--resume=auto", f"--out_dir={out}", "--max_steps=18", "--dtype=fp32"])
    assert max(r["step"] for r in read_log(ckpt_path.parent) if "train/loss" in r) == 18
    assert checkpoints.load_checkpoint(str(ckpt_path))["config"]["dtype"] == "fp32"


def test_resume_locks_the_run_before_reading_its_checkpoint(
    uninterrupted, train_in_process, tmp_path, monkeypatch, capsys
):
    """The run's holder saves step 20 and exits just before this process takes the lock: this process
    must read that checkpoint (finished at 20: nothing to do), not train on from step 16 over it."""
    out, ckpt_path = copied_run(uninterrupted, tmp_path)
    real, holders = td.lock_run, []

    def holder_saves_and_exits_first(run_dir):
        ckpt = checkpoints.load_checkpoint(str(ckpt_path))
        ckpt["step"] = 20
        checkpoints.save_checkpoint(str(ckpt_path), ckpt)
        holders.append(ckpt_path.read_bytes())
        return real(run_dir)

    monkeypatch.setattr(td, "lock_run", holder_saves_and_exits_first)
    train_in_process(["--resume=auto", f"--out_dir={out}", "--max_steps=20"])
    assert "finished at step 20 (max_steps 20); nothing to do" in capsys.readouterr().out
    assert ckpt_path.read_bytes() == holders[0]  # the holder's checkpoint, not overwritten


def test_the_end_test_is_step_at_least_max_steps():
    # lr_at and the loop agree on the end: a resumed checkpoint past a lowered max_steps ends at once
    C = SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert td.lr_at(100, C) == pytest.approx(1e-4) and td.lr_at(150, C) == pytest.approx(1e-4)
    assert td.lr_at(4, C) == pytest.approx(5e-4)  # warmup: (4 + 1) / 10 of lr


# ----------------------------------------------------------------------------- edges


@pytest.mark.parametrize(
    "caption, names_side",
    [
        ("a bright yellow star", False),  # whole words only
        ("copyright 1999", False),
        ("an upright bottle", False),
        ("rightly so", False),
        ("Scizor, ... until there's nothing left but scraps.", False),  # the verb and the adverb of Pokédex prose
        ("Taillow is young, it has only just left its nest.", False),
        ("Left to its own devices, it will constantly practice singing.", False),
        ("Its speed right after takeoff", False),
        ("a cat on the left", True),
        ("Right: a dog", True),
        ("top-left corner", True),
        ("left-handed", True),
        ("Its right arm is packed with meat.", True),
        ("a dog to the right of a cat", True),
        ("a small red circle in the upper left", True),
    ],
)
def test_only_images_whose_caption_names_a_side_are_never_flipped(caption, names_side):
    can_flip = image_data.mirrorable(["a plain caption", caption])
    assert can_flip.tolist() == [True, not names_side]


def test_a_local_encoder_folder_is_stored_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "enc").mkdir()
    monkeypatch.chdir(tmp_path)
    C = SimpleNamespace(dataset="shapes", text_encoder="enc", image_size=0)
    td.resolve_auto(C, SimpleNamespace(ddp=False, master=True, rank=0))
    assert C.text_encoder == str(tmp_path / "enc") and C.image_size == 32


def test_ctrl_c_while_loading_data_exits_cleanly_and_leaves_nothing(
    tiny, train_in_process, tmp_path, monkeypatch, capsys
):
    def interrupted_load(C, sysinfo):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, as it would in a long preprocessing loop
        raise AssertionError("the signal should have stopped the run")

    monkeypatch.setattr(td, "load_data", interrupted_load)
    with pytest.raises(SystemExit) as e:
        train_in_process(tiny + ["--max_steps=5", f"--out_dir={tmp_path}"])
    assert e.value.code == 128 + signal.SIGINT
    assert "before training started; nothing was written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # the new run folder was removed, and its lock with it


# ----------------------------------------------------------------------------- two ranks (gloo on CPU)


def _auto_and_rng(sysinfo):
    rank = sysinfo.rank
    # the `auto` decision: every rank takes rank 0's answer, whatever it would have found itself
    decided = distributed.from_rank0(sysinfo, "hub answers" if rank == 0 else "hub silent")
    # RNG: each rank saves its own state and gets it back, not rank 0's
    torch.manual_seed(100 + rank)
    states = distributed.gather_rng(sysinfo, torch.get_rng_state())
    expected = torch.rand(3)  # what this rank draws next
    torch.manual_seed(999)
    distributed.restore_rng({"torch": states, "cuda": []}, sysinfo)
    return decided, torch.equal(torch.rand(3), expected), len(states)


def test_every_rank_takes_rank0s_auto_decision_and_its_own_rng_state(two_ranks):
    assert two_ranks(_auto_and_rng) == {0: ("hub answers", True, 2), 1: ("hub answers", True, 2)}
