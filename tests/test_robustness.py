"""Bad inputs and faults. Each one ends in ONE clear line (a UserError: `error: ...`, exit code 2, no
traceback) or in a documented skip with a count and a warning; a crash never costs more than the
steps since the last checkpoint, and never the last complete checkpoint itself."""

import errno
import glob
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import the_error_line, user_error

import checkpoints
import image_data
import sample_diffusion as sd
import text_encoders
import train_diffusion as td

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine


@pytest.fixture(scope="module")
def trained_run(small, train_in_process, tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (ckpt.pt holds step 4). Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("trained")
    return train_in_process(small(max_steps=4, ckpt_interval=2, out_dir=out))


def copy_run(trained_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out / "run")
    return out, out / "run"


# ----- 1. overrides


@pytest.mark.parametrize(
    "args, expected",
    [(["--nope=1"], "unknown key --nope"), (["--num_images=two"], "--num_images=two: expected an integer")],
)
def test_sample_override_errors_are_one_line(run_script, args, expected):
    r = run_script(["sample_diffusion.py", *args], timeout=120)
    assert r.returncode == 2 and expected in the_error_line(r.stderr), r.stderr


# ----- 2. dataset folders


def folder_config(path, **over):
    return SimpleNamespace(
        **{"dataset": str(path), "image_column": "image", "caption_column": "text", "image_size": 16, "seed": 0, **over}
    )


def write_png(path, color=(200, 30, 30), size=(24, 20)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def write_meta(folder, rows):
    (folder / "metadata.jsonl").write_bytes(
        b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows)
    )


def _images_without_metadata(d):
    write_png(d / "a.png")


def _empty_metadata(d):
    write_png(d / "a.png")
    (d / "metadata.jsonl").write_text("\n")


def _no_captions(d):
    write_png(d / "a.png")
    write_meta(d, [{"file_name": "a.png"}])


def _caption_not_text(d):
    write_png(d / "a.png")
    write_meta(d, [{"file_name": "a.png", "text": 5}])


def _missing_images(d):
    write_png(d / "a.png")
    write_meta(d, [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}])


def _not_json(d):
    write_png(d / "a.png")
    write_meta(d, [{"file_name": "a.png", "text": "a"}, b"{file_name: a.png}\n"])


def _invalid_utf8(d):
    # latin-1 bytes: `datasets` itself dies in its JSON reader with UnicodeDecodeError wrapped in
    # DatasetGenerationError; check_imagefolder stops first and names the line (an error, not a replacement)
    write_png(d / "a.png")
    write_png(d / "b.png")
    write_meta(d, [{"file_name": "a.png", "text": "a"}, b'{"file_name": "b.png", "text": "caf\xe9 cr\xe8me"}\n'])


@pytest.mark.parametrize(
    "setup, expected",
    [
        (None, "does not exist: pass --dataset=<folder"),
        (lambda d: None, "has no metadata.jsonl"),
        (_images_without_metadata, "has no metadata.jsonl"),
        (_empty_metadata, "is empty: the dataset has no captioned images"),
        (_no_captions, "line 1 lacks 'file_name' or 'text'"),
        (_caption_not_text, "line 1: 'text' is 5, not text"),
        (_missing_images, "names 1 image(s) that do not exist (first: gone.png)"),
        (_not_json, "line 2 is not valid JSON"),
        (_invalid_utf8, "line 2 is not valid UTF-8 (byte 0xe9 at column 36): re-save the file as UTF-8"),
    ],
    ids=[
        "missing",
        "empty",
        "no-metadata",
        "empty-metadata",
        "no-captions",
        "caption-not-text",
        "missing-images",
        "not-json",
        "invalid-utf8",
    ],
)
def test_bad_dataset_folders_are_one_line_errors(tmp_path, setup, expected):
    folder = tmp_path / "data"
    if setup is not None:
        folder.mkdir()
        setup(folder)
    assert expected in user_error(image_data.load_image_dataset, folder_config(folder))


def test_a_missing_folder_that_looks_like_a_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative and without ./: load_image_dataset asks the (offline) Hub
    msg = user_error(image_data.load_image_dataset, folder_config("my_data/train"))
    assert "my_data/train is not a folder here and could not be loaded from the Hub" in msg


def test_train_cli_on_a_missing_folder_exits_2_with_one_line(run_script, small, tmp_path):
    r = run_script(["train_diffusion.py", *small(dataset=tmp_path / "nope", out_dir=tmp_path / "out")], timeout=120)
    assert r.returncode == 2 and "does not exist" in the_error_line(r.stderr)


# ----- 3. images in a folder


def image_bytes(kind):
    """One file's bytes for each kind of image a folder may hold."""
    import numpy as np
    from PIL import Image

    def enc(img, fmt):
        b = io.BytesIO()
        img.save(b, fmt)
        return b.getvalue()

    noise = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    return {
        "truncated.png": lambda: enc(noise, "PNG")[:100],
        "truncated.jpg": lambda: enc(noise, "JPEG")[:300],
        "zero.png": lambda: b"",
        "text.png": lambda: b"I am a text file named .png\n",
        "1x1.png": lambda: enc(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        # 100 Mpx of one color is a 97 kB PNG: PIL warns of a decompression bomb (89 Mpx) but opens it;
        # we skip anything over 64 Mpx from the header alone, before decoding (which would take 300 MB)
        "huge.png": lambda: enc(Image.new("L", (10000, 10000), 0), "PNG"),
        "gray.png": lambda: enc(Image.new("L", (20, 20), 100), "PNG"),
        "palette.png": lambda: enc(Image.new("RGB", (20, 20), (255, 0, 0)).convert("P"), "PNG"),
        "cmyk.jpg": lambda: enc(Image.new("CMYK", (20, 20), (0, 100, 200, 0)), "JPEG"),
        "gray16.png": lambda: enc(Image.new("I;16", (20, 20), 40000), "PNG"),
        "rgba.png": lambda: enc(Image.new("RGBA", (20, 20), (255, 0, 0, 100)), "PNG"),
        "rgb.png": lambda: enc(Image.new("RGB", (30, 20), (10, 20, 30)), "PNG"),
    }[kind]()


READABLE = {  # kind -> the RGB value at the center after to_rgb_square (tolerance for JPEG)
    "gray.png": (100, 100, 100),
    "palette.png": (255, 0, 0),
    "cmyk.jpg": (255, 155, 55),
    "gray16.png": (156, 156, 156),  # 40000 / 65535 * 255: 16-bit keeps its brightness
    "rgba.png": (255, 155, 155),  # alpha 100/255 over white
    "rgb.png": (10, 20, 30),
}
UNREADABLE = {  # kind -> what the skip warning says about it
    "truncated.png": "image file is truncated",
    "truncated.jpg": "Truncated File Read",
    "zero.png": "cannot identify image file",
    "text.png": "cannot identify image file",
    "1x1.png": "unusable size 1x1",
    "huge.png": "unusable size 10000x10000",
}


def make_folder(folder, kinds, captions=None):
    folder.mkdir()
    rows = []
    for i, kind in enumerate(kinds):
        name = f"{i:02d}_{kind}"
        (folder / name).write_bytes(image_bytes(kind))
        rows.append({"file_name": name, "text": captions[i] if captions else f"caption {i} {kind}"})
    write_meta(folder, rows)
    return folder


def test_readable_image_modes_load_and_unreadable_files_are_skipped_with_a_count(tmp_path, capsys):
    kinds = list(READABLE) + ["rgb.png"] * 2 + list(UNREADABLE)  # 8 readable, 6 not
    folder = make_folder(tmp_path / "data", kinds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, captions, _, _ = image_data.load_image_dataset(folder_config(folder))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 and len(captions) == 8
    assert "warning: skipped 6 of 14 images that could not be read or have an unusable size" in capsys.readouterr().err
    assert not [w for w in caught if "DecompressionBomb" in type(w.message).__name__]  # we decide, quietly
    for img, caption in zip(images, captions):
        kind = caption.split()[-1]
        assert kind in READABLE
        assert (img[:, 8, 8].int() - torch.tensor(READABLE[kind])).abs().max() <= 3, (kind, img[:, 8, 8])


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_each_unreadable_kind_is_named_in_the_skip_warning(tmp_path, capsys, kind):
    folder = make_folder(tmp_path / "data", [kind, "rgb.png", "rgb.png", "rgb.png"])
    images, _, _, _ = image_data.load_image_dataset(folder_config(folder))
    err = capsys.readouterr().err
    assert len(images) == 3 and "skipped 1 of 4 images" in err and f"(first: 00_{kind}: {UNREADABLE[kind]}" in err, err


def test_a_mostly_unreadable_dataset_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "data", ["rgb.png", "rgb.png", "zero.png", "text.png", "truncated.png"])
    msg = user_error(image_data.load_image_dataset, folder_config(folder))
    assert "3 of 5 images could not be read" in msg and "check the files" in msg


# ----- 4. captions (and a real run on a messy folder)


def test_messy_folder_trains_with_one_warning_per_problem(small, train_in_process, tmp_path, capsys):
    kinds = list(READABLE) + ["rgb.png"] * 2 + list(UNREADABLE)
    captions = [f"caption {i}" for i in range(len(kinds))]
    captions[0] = captions[1] = ""  # empty: legal (the unconditional caption), but counted and warned
    captions[2] = "word " * 300  # far over the 77-token limit: cut, with one warning
    folder = make_folder(tmp_path / "data", kinds, captions)
    run_dir = train_in_process(small(dataset=folder, max_steps=1, out_dir=tmp_path / "out", eval_images=4))
    out, err = capsys.readouterr()
    assert "7 train / 1 val images" in out  # the 8 readable images, none of the 6 others
    assert err.count("warning: skipped 6 of 14 images") == 1
    assert err.count("warning: 2 of 8 captions are empty") == 1
    assert err.count("longer than 77 tokens and were cut") == 1 and "warning: 1 captions are longer" in err
    assert checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"] == 1


def test_text_encoder_that_cannot_be_loaded_is_one_line():
    msg = user_error(text_encoders.TextEncoder, "nobody/no-such-clip")
    assert "text encoder nobody/no-such-clip could not be loaded" in msg and "--text_encoder=minilm" in msg


def test_local_encoder_folder_without_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    msg = user_error(text_encoders.TextEncoder, str(tmp_path))
    assert f"text encoder {tmp_path} could not be loaded" in msg and "local model folder" in msg


# ----- 5. sizes the model or the data cannot take


def test_unet_config_names_a_valid_image_size():
    C = SimpleNamespace(
        image_size=30, dataset="shapes", **{k: td.DEFAULTS[k] for k in td.MODEL_KEYS}
    )  # channel_mults 1,2,2,4
    assert "image_size 30 cannot be halved 3 times" in user_error(td.unet_config, C) and "(e.g. 24)" in user_error(
        td.unet_config, C
    )


@pytest.mark.parametrize(
    "over, expected",
    [
        # the tiny runs take tests/tiny_run.py's patches of 2: three levels then need a multiple of 2 x 4
        (
            dict(image_size=30, channel_mults="1,2,2", attention_levels="1"),
            "after patches of 2 by channel_mults (1, 2, 2): use a multiple of 8 (e.g. 24)",
        ),
        (
            dict(shapes_num_images=32, batch_size=64),
            "batch_size 64 is larger than the 31 training images per process: lower --batch_size",
        ),
    ],
    ids=["image_size", "batch_size"],
)
def test_sizes_the_run_cannot_take_are_one_line(run_script, small, tmp_path, over, expected):
    r = run_script(["train_diffusion.py", *small(out_dir=tmp_path, **over)], timeout=180)
    assert r.returncode == 2 and expected in the_error_line(r.stderr)


# ----- 6. checkpoints


class RunsCode:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _truncated(good, path, marker):
    data = open(good, "rb").read()
    path.write_bytes(data[: len(data) // 2])


def _other_layout(good, path, marker):
    ckpt = torch.load(good, weights_only=True)
    ckpt["model_args"]["base_channels"] = 64  # the tensors are those of base_channels=32
    torch.save(ckpt, path)


def _pickle_dump(good, path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": RunsCode(marker), "model_args": {}}, f)


def _torch_save(good, path, marker):
    torch.save(
        {"model": RunsCode(marker), "model_args": {}, "step": 0, "num_timesteps": 1000, "text_encoder": "minilm"}, path
    )


def _not_ours(good, path, marker):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize(
    "make, expected",
    [
        (None, "does not exist"),
        (lambda good, path, marker: path.write_bytes(b""), "is empty (0 bytes)"),
        (_truncated, "is not a checkpoint written by torch.save (truncated"),
        (
            lambda good, path, marker: path.write_bytes(random.Random(0).randbytes(5000)),
            "is not a checkpoint written by torch.save",
        ),
        (_other_layout, "checkpoint weights do not fit its model_args (size mismatch"),
        (_pickle_dump, "is not a checkpoint written by torch.save"),  # a bare pickle: refused before unpickling
        (_torch_save, "refused unread (Trying to load unsupported GLOBAL posix.system"),
        (_not_ours, "is not a checkpoint of this repo"),
    ],
    ids=[
        "missing",
        "empty",
        "truncated",
        "random-bytes",
        "other-layout",
        "code-via-pickle",
        "code-via-torch-save",
        "not-ours",
    ],
)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, trained_run, make, expected):
    path, marker = tmp_path / "bad.pt", tmp_path / "MARKER"
    if make is not None:
        make(os.path.join(trained_run, "ckpt.pt"), path, marker)
    assert expected in user_error(lambda: checkpoints.build_model(checkpoints.load_checkpoint(str(path))))
    from_cli = "no checkpoint in" if make is None else expected  # sample_diffusion finds nothing to load
    assert from_cli in user_error(sd.main, [f"--checkpoint={path}", f"--out_dir={tmp_path / 'samples'}"])
    assert not marker.exists() and not (tmp_path / "samples").exists()


def test_code_in_a_checkpoint_is_never_run_by_sample_diffusion(run_script, tmp_path):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(RunsCode(marker))
    pickle.loads(payload)  # the payload is live: an unsafe load does run it
    assert marker.exists()
    marker.unlink()
    for name, make in (("torch_save.pt", _torch_save), ("pickle_dump.pt", _pickle_dump)):
        make(None, tmp_path / name, marker)
        r = run_script(["sample_diffusion.py", f"--checkpoint={tmp_path / name}", f"--out_dir={tmp_path}"], timeout=120)
        assert r.returncode == 2 and name in the_error_line(r.stderr)
        assert not marker.exists()


def test_find_checkpoint_ignores_temporary_files(tmp_path):
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "ckpt.pt.tmp.12345").write_bytes(b"half a checkpoint")
    assert checkpoints.find_checkpoint(str(run)) is None and checkpoints.find_checkpoint(str(tmp_path / "out")) is None


# ----- 7. sampling settings


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--sampler=ddim", "--steps=0"], "--steps=0 is out of range: use a finite number in [1, 100000]"),
        (["--sampler=ddim", "--steps=1001"], "--steps=1001 is out of range: DDIM takes 1 to 1000 steps"),
        (["--guidance_scale=-1"], "--guidance_scale=-1.0 is out of range: use a finite number in [0, 100]"),
        (["--guidance_scale=nan"], "--guidance_scale=nan is out of range"),
        (["--sampler=euler"], "--sampler=euler is out of range: use one of ddpm, ddim"),
        (["--num_images=0"], "--num_images=0 is out of range"),
        (["--eta=1.5"], "--eta=1.5 is out of range: use a finite number in [0, 1]"),
    ],
    ids=["steps-0", "steps-over-T", "negative-guidance", "nan-guidance", "unknown-sampler", "no-images", "eta-over-1"],
)
def test_sampling_settings_out_of_range_are_one_line(tmp_path, trained_run, args, expected):
    msg = user_error(sd.main, [f"--checkpoint={trained_run}", f"--out_dir={tmp_path / 'samples'}", *args])
    assert expected in msg and not (tmp_path / "samples").exists()


# ----- 8. faults


def logged_train_steps(read_log, run_dir, skip=0):
    return [r["step"] for r in read_log(run_dir)[skip:] if "train/loss" in r]


def wait_for(condition, proc, timeout=120, poll=0.02):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early with code {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_from_the_last_complete_checkpoint(
    read_log, root, small, tmp_path, trained_run
):
    out, run_dir = copy_run(trained_run, tmp_path)
    ckpt_path, interval = str(run_dir / "ckpt.pt"), 3
    cmd = [
        sys.executable,
        "train_diffusion.py",
        *small(max_steps=1000, ckpt_interval=interval, out_dir=out),
        "--resume=auto",
    ]
    rng = random.Random(0)
    kills, mid_write, t0 = 0, 0, time.time()
    while kills < 5 or mid_write == 0:
        assert kills < 10, "never caught a checkpoint being written"
        k = checkpoints.load_checkpoint(ckpt_path)["step"]
        n_lines = len(read_log(run_dir))
        with open(tmp_path / "stderr.txt", "w") as errf:
            proc = subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.DEVNULL, stderr=errf)
            try:
                aim_mid_write = kills % 2 == 1 and mid_write == 0  # kills 1, 3, ...: while ckpt.pt.tmp.<pid> is written
                if aim_mid_write:  # (after a step: a run resumed at a multiple of 3 first re-saves the same step)
                    tmp = f"{ckpt_path}.tmp.{proc.pid}"
                    wait_for(
                        lambda: os.path.exists(tmp) and logged_train_steps(read_log, run_dir, n_lines), proc, poll=0.001
                    )
                else:  # anywhere: after a random number of steps and a random pause
                    n = rng.randint(1, 5)
                    wait_for(lambda: len(logged_train_steps(read_log, run_dir, n_lines)) >= n, proc)
                    time.sleep(rng.uniform(0, 1.0))
            finally:
                proc.kill()
                proc.wait()
        kills += 1
        left = glob.glob(glob.escape(ckpt_path) + ".tmp.*")
        mid_write += bool(left)
        assert (
            checkpoints.find_checkpoint(str(out)) == ckpt_path
            and checkpoints.find_checkpoint(str(run_dir)) == ckpt_path
        )  # never a .tmp
        k2 = checkpoints.load_checkpoint(ckpt_path)["step"]  # always loads
        steps = logged_train_steps(read_log, run_dir, n_lines)
        assert steps and steps[0] == k + 1, (k, steps)  # resumed from the checkpoint on disk, and made progress
        assert k <= k2 <= steps[-1] and steps[-1] - k2 <= interval, (k, k2, steps)  # lost at most ckpt_interval steps

    # one last resume runs to the end: it starts after the last checkpoint and clears the leftover temporaries
    k = checkpoints.load_checkpoint(ckpt_path)["step"]
    n_lines = len(read_log(run_dir))
    r = subprocess.run(cmd + [f"--max_steps={k + 2}"], cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert logged_train_steps(read_log, run_dir, n_lines) == [k + 1, k + 2]
    assert checkpoints.load_checkpoint(ckpt_path)["step"] == k + 2 and not glob.glob(glob.escape(ckpt_path) + ".tmp.*")
    print(f"{kills} kills ({mid_write} while writing a checkpoint) in {time.time() - t0:.0f} s")


def test_sigterm_saves_and_exits_cleanly(read_log, root, small, tmp_path, trained_run):
    out, run_dir = copy_run(trained_run, tmp_path)
    cmd = [
        sys.executable,
        "train_diffusion.py",
        *small(max_steps=1000, ckpt_interval=1000, out_dir=out),
        "--resume=auto",
    ]
    n_lines = len(read_log(run_dir))
    proc = subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(logged_train_steps(read_log, run_dir, n_lines)) >= 2, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr and "error:" not in stderr, stderr
    steps = logged_train_steps(read_log, run_dir, n_lines)
    assert steps[0] == 5 and checkpoints.load_checkpoint(str(run_dir / "ckpt.pt"))["step"] == steps[-1]
    assert f"stopped by signal at step {steps[-1]}" in stdout


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    small, train_in_process, tmp_path, trained_run, monkeypatch
):
    out, run_dir = copy_run(trained_run, tmp_path)
    before = torch.load(run_dir / "ckpt.pt", weights_only=True)
    # resumed at step 4; the loss of step 4 -> 5 is finite, that of step 5 -> 6 is NaN (as after a
    # divergence: no learning rate in range makes these tiny runs diverge in two steps reliably).
    calls, real_loss = [], td.diffusion_loss
    monkeypatch.setattr(
        td,
        "diffusion_loss",
        lambda *a, **kw: real_loss(*a, **kw) * (float("nan") if calls.append(1) or len(calls) > 1 else 1),
    )
    line = user_error(train_in_process, small(max_steps=1000, ckpt_interval=2, out_dir=out) + ["--resume=auto"])
    assert (
        "the loss or the gradients became NaN or inf before step 6" in line and "last good checkpoint (step 4)" in line
    )
    after = checkpoints.load_checkpoint(str(run_dir / "ckpt.pt"))
    assert after["step"] == 4
    for part in ("model", "ema"):
        for name, w in after[part].items():
            assert torch.equal(w, before[part][name]) and torch.isfinite(w).all(), name


def _torch_save_fails_partway(monkeypatch):
    def save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04" + b"\0" * 10_000)  # a good start...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def _kernel_says_disk_full(monkeypatch):
    # the real torch.save writing into /dev/full, where every write fails with ENOSPC: does the
    # kernel's error come out of torch.save as an OSError (and not, say, a RuntimeError)?
    real_open = open
    monkeypatch.setattr(
        checkpoints,
        "open",
        lambda p, *a, **kw: real_open("/dev/full" if ".tmp." in str(p) else p, *a, **kw),
        raising=False,
    )


@pytest.mark.parametrize(
    "fill_disk", [_torch_save_fails_partway, _kernel_says_disk_full], ids=["torch.save-raises", "dev-full"]
)
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, trained_run, monkeypatch, fill_disk):
    if fill_disk is _kernel_says_disk_full and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    path = tmp_path / "ckpt.pt"
    shutil.copy(os.path.join(trained_run, "ckpt.pt"), path)
    good = checkpoints.load_checkpoint(str(path))
    (tmp_path / "ckpt.pt.tmp.999999").write_bytes(b"left by a killed run")
    fill_disk(monkeypatch)
    state = {**good, "step": good["step"] + 1}
    msg = user_error(checkpoints.save_checkpoint, str(path), state)
    assert f"could not write checkpoint {path} (No space left on device): the previous checkpoint is kept" in msg
    assert "resume with --resume=auto" in msg
    monkeypatch.undo()
    kept = checkpoints.load_checkpoint(str(path))
    assert kept["step"] == good["step"] and torch.equal(
        kept["model"]["conv_out.weight"], good["model"]["conv_out.weight"]
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # neither our temporary nor the stale one is left


def test_full_disk_in_the_training_loop_is_one_line(small, train_in_process, tmp_path, trained_run, monkeypatch):
    out, run_dir = copy_run(trained_run, tmp_path)
    before = (run_dir / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    # resumed at step 4 with ckpt_interval 2: the loop saves at once, and the write fails
    msg = user_error(train_in_process, small(max_steps=1000, ckpt_interval=2, out_dir=out) + ["--resume=auto"])
    assert "could not write checkpoint" in msg and "free space and resume with --resume=auto" in msg
    assert (run_dir / "ckpt.pt").read_bytes() == before and not glob.glob(str(run_dir / "ckpt.pt.tmp.*"))


def test_non_finite_weights_never_replace_a_checkpoint(tmp_path, trained_run):
    path = tmp_path / "ckpt.pt"
    shutil.copy(os.path.join(trained_run, "ckpt.pt"), path)
    good = checkpoints.load_checkpoint(str(path))
    bad = {**good, "step": good["step"] + 1, "model": {k: v.clone() for k, v in good["model"].items()}}
    bad["model"]["conv_out.weight"][0] = float("nan")
    msg = user_error(checkpoints.save_checkpoint, str(path), bad)
    assert "are NaN or inf: checkpoint not written" in msg
    assert checkpoints.load_checkpoint(str(path))["step"] == good["step"] and os.listdir(tmp_path) == ["ckpt.pt"]
