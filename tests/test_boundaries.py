"""Every input at the three boundaries where a user's files come in or go out: the image folder
(its metadata.jsonl files, checked with the rules `datasets` applies, before `load_dataset`), the
checkpoint (every field, before torch sees it) and the output folders (before any work, and a save
that fails for any reason). Each ends in one line (`error: ...`, exit code 2) or a sensible accept,
nothing already written is lost, and under torchrun one rank's failure ends every rank within
seconds with the message printed once."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import the_error_line, user_error

import checkpoints
import image_data
import sample_diffusion as sd
import train_diffusion as td

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained_run(small, train_in_process, tmp_path_factory):
    """A tiny run whose ckpt.pt holds step 2. Tests copy it before changing it."""
    return train_in_process(small(max_steps=2, ckpt_interval=2, out_dir=tmp_path_factory.mktemp("trained")))


@pytest.fixture(scope="module")
def good_ckpt(trained_run):
    return torch.load(os.path.join(trained_run, "ckpt.pt"), map_location="cpu", weights_only=True)


# ----- 1. the image folder: metadata.jsonl lines `datasets` would reject after a line-by-line check passes


def folder_config(path):
    return SimpleNamespace(dataset=str(path), image_column="image", caption_column="text", image_size=16, seed=0)


def png(path, color=(200, 30, 30)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 20), color).save(path, format="PNG")


def jsonl(path, rows):
    with open(path, "wb") as f:
        f.write(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))


def make_folder(root, rows, files=("a.png", "b.png"), extra=None):
    """A folder with `files` (PNGs), metadata.jsonl holding `rows`, then extra(folder) for the rest."""
    folder = root / "data"
    for name in files:
        png(str(folder / name))
    jsonl(folder / "metadata.jsonl", rows)
    if extra:
        extra(folder)
    return folder


A, B = {"file_name": "a.png", "text": "a red one"}, {"file_name": "b.png", "text": "a blue one"}

REFUSED = {  # id -> (rows, extra, what the one line says)
    "parent-dir": ([A, {"file_name": "../b.png", "text": "x"}], None, "line 2: file_name '../b.png' points outside"),
    "absolute": ([A, {"file_name": "/etc/hostname", "text": "x"}], None, "file_name '/etc/hostname' points outside"),
    "url": ([A, {"file_name": "file:///etc/hostname", "text": "x"}], None, "is a URL"),
    "type-changes": (
        [{**A, "score": 1}, {**B, "score": "high"}],
        None,
        "column 'score' is a number on line 1 but text on line 2",
    ),
    "bool-then-number": ([{**A, "ok": True}, {**B, "ok": 2}], None, "column 'ok' is true/false on line 1 but a number"),
    "list-items-change": ([{**A, "tags": [1]}, {**B, "tags": ["x"]}], None, "column 'tags[]' is a number on line 1"),
    "list-then-text": ([{**A, "tags": [1]}, {**B, "tags": "x"}], None, "column 'tags' is a list on line 1 but text"),
    "nested-field-changes": ([{**A, "m": {"k": 1}}, {**B, "m": {"k": "x"}}], None, "column 'm.k' is a number"),
    "key-twice": ([A, b'{"file_name": "b.png", "text": "x", "text": "y"}\n'], None, "line 2 has the key 'text' twice"),
    "file-name-not-text": ([A, {"file_name": 5, "text": "x"}], None, "line 2: 'file_name' is 5, not a file name"),
    "file-name-empty": ([A, {"file_name": "", "text": "x"}], None, "line 2: 'file_name' is empty"),
    "file-name-a-folder": (
        [A, {"file_name": "sub", "text": "x"}],
        lambda d: os.mkdir(d / "sub"),
        "do not exist (first: sub)",
    ),
    "csv-beside": (
        [A, B],
        lambda d: (d / "metadata.csv").write_text("file_name,text\na.png,x\n"),
        "holds metadata.csv beside metadata.jsonl",
    ),
    "parquet-in-a-subfolder": (
        [A, B],
        lambda d: (os.mkdir(d / "sub"), (d / "sub" / "metadata.parquet").write_bytes(b"PAR1")),
        "holds sub/metadata.parquet beside metadata.jsonl",
    ),
    "subfolder-metadata-other-columns": (
        [A, B],
        lambda d: (png(str(d / "sub" / "c.png")), jsonl(d / "sub" / "metadata.jsonl", [{"file_name": "c.png"}])),
        "sub/metadata.jsonl line 1 lacks 'file_name' or 'text'",
    ),
    "subfolder-metadata-other-types": (
        [{**A, "score": 1}, {**B, "score": 2}],
        lambda d: (
            png(str(d / "sub" / "c.png")),
            jsonl(d / "sub" / "metadata.jsonl", [{"file_name": "c.png", "text": "x", "score": "high"}]),
        ),
        "column 'score' is a number in metadata.jsonl but text in sub/metadata.jsonl",
    ),
    "other-image-column-missing": (
        [{**A, "mask_file_name": "gone.png"}, {**B, "mask_file_name": "a.png"}],
        None,
        "names 1 image(s) that do not exist (first: gone.png)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_metadata_that_datasets_rejects_is_one_line_before_load_dataset(tmp_path, monkeypatch, case):
    rows, extra, expected = REFUSED[case]
    folder = make_folder(tmp_path, rows, extra=extra)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: pytest.fail("load_dataset reached"))
    assert expected in user_error(image_data.load_image_dataset, folder_config(folder))


def _subfolder_alike(d):
    png(str(d / "sub" / "c.png"))
    jsonl(d / "sub" / "metadata.jsonl", [{"file_name": "c.png", "text": "a green one"}])


ACCEPTED = {  # id -> (rows, extra, captions loaded, a warning that must be printed or None)
    "duplicate-lines": ([A, B, {**A, "text": "again"}], None, 3, "names 1 file on more than one line (first: a.png"),
    "byte-order-mark": ([b"\xef\xbb\xbf" + json.dumps(A).encode() + b"\n", B], None, 2, None),
    "windows-line-ends": ([json.dumps(A).encode() + b"\r\n", json.dumps(B).encode() + b"\r\n"], None, 2, None),
    "dot-slash-and-dot-dot-inside": ([{**A, "file_name": "./a.png"}, {**B, "file_name": "x/../b.png"}], None, 2, None),
    "numbers-then-floats-and-nulls": (
        [{**A, "s": 1}, {**B, "s": 1.5}, {**A, "file_name": "c.png", "s": None}],
        lambda d: png(str(d / "c.png")),
        3,
        None,
    ),
    "a-column-on-some-lines": ([{**A, "extra": "x"}, B], None, 2, None),
    "images-not-in-metadata": ([A, B], lambda d: png(str(d / "stray.png")), 2, "1 image file(s) in"),
    "subfolder-metadata-alike": ([A, B], _subfolder_alike, 3, None),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_metadata_that_datasets_takes_loads_with_its_warning(tmp_path, capsys, case):
    rows, extra, n, warning = ACCEPTED[case]
    folder = make_folder(tmp_path, rows, extra=extra)
    images, captions, _, _ = image_data.load_image_dataset(folder_config(folder))
    err = capsys.readouterr().err
    assert len(images) == len(captions) == n and "Traceback" not in err
    assert (warning in err) if warning else "warning" not in err, err


# ----- 2. checkpoints: every field is checked before torch sees it


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _set_arg(key, value):
    return lambda c: c["model_args"].__setitem__(key, value)


def _weight(part, value):
    def edit(c):
        c[part] = {k: v.clone() for k, v in c[part].items()}
        next(v for v in c[part].values() if v.is_floating_point()).view(-1)[0] = value

    return edit


FIELDS = {  # id -> (edit of a good checkpoint, what the one line says)
    "step-text": (_set("step", "4"), "step is '4': expected an integer"),
    "step-negative": (_set("step", -1), "step is -1"),
    "step-bool": (_set("step", True), "step is True"),
    "timesteps-float": (_set("num_timesteps", 1000.5), "num_timesteps is 1000.5"),
    "timesteps-zero": (_set("num_timesteps", 0), "num_timesteps is 0"),
    "prediction-unknown": (_set("prediction_type", "x0"), "prediction_type is 'x0': expected one of v, eps"),
    "encoder-not-text": (_set("text_encoder", 5), "text_encoder is 5"),
    "encoder-empty": (_set("text_encoder", ""), "text_encoder is ''"),
    "dataset-none": (_set("dataset", None), "dataset is None"),
    "model-args-list": (_set("model_args", [1, 2]), "model_args is [1, 2]: expected a dict"),
    "model-args-unknown-key": (_set_arg("wings", 2), "model_args has the unknown key 'wings'"),
    "model-args-missing-key": (lambda c: c.__setitem__("model_args", {}), "model_args lacks image_size"),
    "base-channels-text": (_set_arg("base_channels", "32"), "model_args base_channels is '32'"),
    "channel-mults-text": (_set_arg("channel_mults", "1,2"), "model_args channel_mults is '1,2'"),
    "dropout-over-1": (_set_arg("dropout", 2.0), "model_args dropout is 2.0"),
    "heads-zero": (_set_arg("n_heads", 0), "model_args n_heads is 0"),
    "layout-impossible": (_set_arg("patch_size", 3), "checkpoint model_args are invalid (image_size 16 cannot"),
    "in-channels-4": (_set_arg("in_channels", 4), "model_args in_channels is 4"),
    "model-a-tensor": (_set("model", torch.zeros(3)), "model is not a dict of tensors"),
    "model-value-not-tensor": (
        lambda c: c.__setitem__("model", {**c["model"], "conv_in.weight": [1.0]}),
        "model['conv_in.weight'] is not a tensor",
    ),
    "model-lacks-a-weight": (
        lambda c: c.__setitem__("model", {k: v for k, v in c["model"].items() if k != "conv_in.weight"}),
        "model lacks conv_in.weight",
    ),
    "model-extra-weight": (
        lambda c: c.__setitem__("model", {**c["model"], "extra.weight": torch.zeros(2)}),
        "model holds extra.weight, which its model_args have no place for",
    ),
    "model-int-weights": (
        lambda c: c.__setitem__("model", {**c["model"], "conv_in.weight": c["model"]["conv_in.weight"].long()}),
        "model['conv_in.weight'] is torch.int64",
    ),
    "model-nan": (_weight("model", float("nan")), "model holds NaN or inf weights"),
    "ema-inf": (_weight("ema", float("inf")), "ema holds NaN or inf weights"),
    "ema-a-list": (_set("ema", [1]), "ema is not a dict of tensors"),
    "optimizer-text": (_set("optimizer", "adam"), "optimizer is 'adam': expected a dict"),
    "optimizer-state-shapes": (
        lambda c: c.__setitem__(
            "optimizer",
            {
                **c["optimizer"],
                "state": {k: {**v, "exp_avg": torch.zeros(1)} for k, v in c["optimizer"]["state"].items()},
            },
        ),
        "optimizer state of parameter 0 has shape",
    ),
    "rng-not-tensors": (_set("rng", {"torch": ["x"], "cuda": []}), "rng is not"),
    "config-list": (_set("config", [1]), "config is [1]: expected a dict"),
    "wandb-id-number": (_set("wandb_id", 5), "wandb_id is 5"),
}


@pytest.mark.parametrize("case", list(FIELDS))
def test_each_checkpoint_field_is_checked_in_one_line(tmp_path, good_ckpt, case):
    edit, expected = FIELDS[case]
    ckpt = {**good_ckpt, "model_args": dict(good_ckpt["model_args"])}
    edit(ckpt)
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    assert expected in user_error(checkpoints.load_checkpoint, str(path))


def test_a_checkpoint_written_before_text_layers_loads_as_the_u_net_without_them(tmp_path, good_ckpt):
    ckpt = {**good_ckpt, "model_args": {k: v for k, v in good_ckpt["model_args"].items() if k != "text_layers"}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = checkpoints.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert checkpoints.build_model(loaded, "ema").cfg.text_layers == 0


def test_a_checkpoint_with_nan_weights_writes_no_images(tmp_path, good_ckpt):
    ckpt = {**good_ckpt}
    _weight("ema", float("nan"))(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    msg = user_error(sd.main, [f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'samples'}"])
    assert "ema holds NaN or inf weights" in msg and not (tmp_path / "samples").exists()


@pytest.mark.parametrize("case", ["rng-not-tensors", "config-list", "optimizer-state-shapes", "model-nan"])
def test_resume_checks_the_checkpoint_in_one_line(tmp_path, small, good_ckpt, train_in_process, case):
    edit, expected = FIELDS[case]
    ckpt = {**good_ckpt}
    edit(ckpt)
    os.makedirs(tmp_path / "out" / "run")
    torch.save(ckpt, tmp_path / "out" / "run" / "ckpt.pt")
    before = (tmp_path / "out" / "run" / "ckpt.pt").read_bytes()
    msg = user_error(train_in_process, small(max_steps=4, out_dir=tmp_path / "out") + ["--resume=auto"])
    assert expected in msg and (tmp_path / "out" / "run" / "ckpt.pt").read_bytes() == before


# ----- 3. output folders: checked before any work; a save that fails for any reason keeps the last checkpoint


def _a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    return tmp_path / "taken", "is a file, not a folder"


def _under_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    return tmp_path / "taken" / "out", "is a file, not a folder"


def _dangling_link(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    return tmp_path / "link", "is a file, not a folder"


def _name_too_long(tmp_path):
    return tmp_path / ("x" * 300), "(File name too long): pass a writable --out_dir"


OUT_DIRS = {"a-file": _a_file, "under-a-file": _under_a_file, "dangling-link": _dangling_link, "long": _name_too_long}


@pytest.mark.parametrize("case", list(OUT_DIRS))
def test_training_out_dir_that_cannot_hold_a_run_is_one_line(tmp_path, small, train_in_process, monkeypatch, case):
    out, expected = OUT_DIRS[case](tmp_path)
    monkeypatch.setattr(td, "load_data", lambda *a: pytest.fail("the data was loaded before the out_dir was checked"))
    before = sorted(os.listdir(tmp_path))
    assert expected in user_error(train_in_process, small(max_steps=2, out_dir=out))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("case", list(OUT_DIRS))
def test_sampling_out_dir_is_checked_before_sampling(tmp_path, trained_run, monkeypatch, case):
    out, expected = OUT_DIRS[case](tmp_path)
    monkeypatch.setattr(sd, "load_checkpoint", lambda *a: pytest.fail("the checkpoint was read before out_dir's check"))
    before = sorted(os.listdir(tmp_path))
    assert expected in user_error(sd.main, [f"--checkpoint={trained_run}", f"--out_dir={out}"])
    assert sorted(os.listdir(tmp_path)) == before


def test_sampling_onto_a_full_disk_is_one_line(tmp_path, trained_run, monkeypatch):
    import torchvision.utils

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torchvision.utils, "save_image", full)
    msg = user_error(sd.main, [f"--checkpoint={trained_run}", f"--out_dir={tmp_path}", "--sampler=ddim", "--steps=1"])
    assert f"could not write {tmp_path}" in msg and "No space left on device" in msg


def _raises_like_a_full_disk(obj, f, *a, **kw):
    # what torch.save raises on a real full disk: its zip writer checks the bytes written, not an OSError
    f.write(b"PK\x03\x04" + b"\0" * 1000)
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 11264 vs 11200")


def test_a_save_that_fails_with_any_error_keeps_the_previous_checkpoint(tmp_path, trained_run, monkeypatch):
    path = tmp_path / "ckpt.pt"
    shutil.copy(os.path.join(trained_run, "ckpt.pt"), path)
    before = path.read_bytes()
    good = checkpoints.load_checkpoint(str(path))
    monkeypatch.setattr(torch, "save", _raises_like_a_full_disk)
    msg = user_error(checkpoints.save_checkpoint, str(path), {**good, "step": good["step"] + 1})
    assert f"could not write checkpoint {path}" in msg and "the previous checkpoint is kept" in msg
    assert "unexpected pos" in msg
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_runtime_error_while_saving_in_the_loop_is_one_line(
    tmp_path, small, train_in_process, trained_run, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out / "run")
    before = (out / "run" / "ckpt.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _raises_like_a_full_disk)
    msg = user_error(train_in_process, small(max_steps=10, ckpt_interval=2, out_dir=out) + ["--resume=auto"])
    assert f"could not write checkpoint {out / 'run' / 'ckpt.pt'}" in msg and "--resume=auto" in msg
    assert (out / "run" / "ckpt.pt").read_bytes() == before


# A real full (and a real read-only) filesystem: a small tmpfs in a mount namespace of its own, so that nothing
# outside the test sees it. The script runs in that namespace and reports what happened as JSON.
NAMESPACE_SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys
    import configurator, sample_diffusion as sd, train_diffusion as td
    args, mnt, ro, outside, trained = json.loads(sys.argv[1])
    def run(fn, argv):
        try:
            fn(argv)
            return None
        except configurator.UserError as e:
            return str(e)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro], check=True)
    res = {}
    res["train_ro"] = run(td.main, args + ["--max_steps=1", f"--out_dir={ro}/out"])
    res["sample_ro"] = run(sd.main, [f"--checkpoint={trained}", f"--out_dir={ro}/samples"])
    run_dir = td.main(args + ["--max_steps=1", "--ckpt_interval=1", f"--out_dir={mnt}/out"])
    ckpt = os.path.join(run_dir, "ckpt.pt")
    shutil.copy(ckpt, os.path.join(outside, "before.pt"))
    # room for the checkpoint and half another: the next save fills the disk half-way through
    used = shutil.disk_usage(mnt).used
    size = used + os.path.getsize(ckpt) // 2
    subprocess.run(["mount", "-o", f"remount,size={size}", mnt], check=True)
    more = ["--max_steps=4", "--ckpt_interval=1", f"--out_dir={mnt}/out", "--resume=auto"]
    res["train_full"] = run(td.main, args + more)
    shutil.copy(ckpt, os.path.join(outside, "after.pt"))
    res["left"] = sorted(os.listdir(run_dir))
    res["run_dir"] = run_dir
    print("RESULT " + json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def namespace_run(root, small, trained_run, tmp_path_factory):
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no tmpfs in a mount namespace here (unshare -m + mount: {probe.stderr.decode().strip()[:200]})")
    d = tmp_path_factory.mktemp("namespace")
    for sub in ("mnt", "ro", "outside"):
        os.mkdir(d / sub)
    args = small(wandb_mode="disabled")
    spec = json.dumps([args, str(d / "mnt"), str(d / "ro"), str(d / "outside"), str(trained_run)])
    r = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", NAMESPACE_SCRIPT, spec],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(lines[0][len("RESULT ") :]), d / "outside", r.stderr


def test_a_real_full_disk_keeps_the_last_checkpoint_and_names_the_folder(namespace_run):
    res, outside, stderr = namespace_run
    assert "Traceback" not in stderr, stderr
    msg = res["train_full"]
    assert msg and f"could not write checkpoint {res['run_dir']}/ckpt.pt" in msg and "No space left" in msg, msg
    assert (outside / "before.pt").read_bytes() == (outside / "after.pt").read_bytes()
    assert not [f for f in res["left"] if ".tmp." in f], res["left"]


def test_a_read_only_out_dir_is_one_line_before_any_work(namespace_run):
    res, _, _ = namespace_run
    for key in ("train_ro", "sample_ro"):
        assert res[key] and "Read-only file system" in res[key] and "pass a writable --out_dir" in res[key], res


# ----- 4. text from the command line


@pytest.mark.parametrize("key", ["condition", "checkpoint", "out_dir"])
def test_command_line_text_that_is_not_utf8_is_one_line(tmp_path, key):
    # what Python makes of the bytes caf\xe9 in argv on a UTF-8 system: a lone surrogate
    msg = user_error(sd.main, [f"--{key}=caf" + b"\xe9".decode("utf-8", "surrogateescape")])
    assert f"--{key}=caf\\xe9 is not valid UTF-8 (byte 0xe9 at character 4)" in msg


def test_sample_cli_with_latin1_bytes_in_the_prompt_is_one_line(root, tmp_path, trained_run):
    r = subprocess.run(
        [sys.executable, "sample_diffusion.py", f"--checkpoint={trained_run}".encode(), b"--condition=caf\xe9"],
        cwd=root,
        env={**ENV, "LC_ALL": "C.UTF-8"},
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 2 and "caf\\xe9 is not valid UTF-8 (byte 0xe9" in the_error_line(
        r.stderr.decode(errors="replace")
    )


# ----- 5. torchrun: a failing rank never leaves the others waiting


def _locked_by_a_live_process(out, tmp_path, holder):
    return ["--resume=auto"], "is in use by process"


def _bad_dataset(out, tmp_path, holder):
    folder = tmp_path / "data"
    folder.mkdir()
    return [f"--dataset={folder}"], "has no metadata.jsonl"


@pytest.mark.parametrize("fail", [_locked_by_a_live_process, _bad_dataset], ids=["run-locked", "bad-dataset"])
def test_a_failing_rank_ends_every_rank_within_seconds_with_one_message(root, small, trained_run, tmp_path, fail):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "run" / "run.lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        extra, expected = fail(out, tmp_path, holder)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train_diffusion.py",
        ]
        t0 = time.time()
        r = subprocess.run(
            cmd + small(max_steps=8, out_dir=out) + extra, cwd=root, env=ENV, capture_output=True, text=True, timeout=90
        )
        seconds = time.time() - t0
    finally:
        holder.kill()
        holder.wait()
    output = r.stdout + r.stderr
    assert r.returncode != 0 and seconds < 30, (seconds, output[-3000:])
    errors = [ln for ln in output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and expected in errors[0], output[-3000:]
    assert "[rank1]" not in output and 'train_diffusion.py", line' not in output, output[-3000:]
