"""train_diffusion.py end to end on tiny offline runs (built-in shapes, packaged MiniLM)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import torch

import checkpoints
import image_data
import text_encoders
import train_diffusion as td


def test_tiny_shapes_run_learns(read_log, tiny, tmp_path):
    run_dir = td.main(tiny + ["--max_steps=60", "--eval_interval=30", "--ckpt_interval=30", f"--out_dir={tmp_path}"])
    vals = [r["val/loss"] for r in read_log(run_dir) if "val/loss" in r]
    assert len(vals) == 3  # steps 0, 30, 60
    assert vals[-1] < 0.6 * vals[0], vals
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["step"] == 60 and ckpt["dataset"] == "shapes" and ckpt["text_encoder"] == "minilm"
    assert ckpt["model_args"]["context_dim"] == 384 and ckpt["model_args"]["image_size"] == 16
    assert {"model", "ema", "optimizer", "rng", "config", "prediction_type"} <= set(ckpt) and "lr_schedule" not in ckpt
    assert os.path.isfile(os.path.join(run_dir, "samples_0000060.png"))
    # the EMA has moved away from the initial weights but is not the raw model
    assert not torch.equal(ckpt["ema"]["conv_out.weight"], ckpt["model"]["conv_out.weight"])


def test_auto_falls_back_offline_with_banner(tiny, tmp_path, capsys):
    args = [a for a in tiny if not a.startswith(("--dataset", "--text_encoder"))] + [
        "--dataset=auto",
        "--text_encoder=auto",
    ]
    run_dir = td.main(args + ["--max_steps=1", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "Hugging Face Hub cannot be reached" in err and "--dataset=shapes" in err
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["dataset"] == "shapes" and ckpt["text_encoder"] == "minilm"


def test_caption_embeddings_are_computed_once_per_distinct_caption():
    seen = []

    def fake_encoder(captions):
        seen.extend(captions)
        L = 2 + max(len(c.split()) for c in captions)
        return torch.arange(len(captions) * L * 3, dtype=torch.float).view(len(captions), L, 3), torch.ones(
            len(captions), L, dtype=torch.bool
        )

    captions = ["a red circle", "a blue square", "a red circle", "", "a blue square", "a red circle"]
    table, mask, rows = text_encoders.encode_captions(fake_encoder, captions, batch=2)
    assert sorted(seen) == sorted(["", "a red circle", "a blue square"])  # each once, the empty one included
    assert rows[0] == rows[2] == rows[5] and rows[1] == rows[4] and rows[3] == 0  # row 0 is ""
    assert table.shape[:2] == mask.shape and table.shape[0] == 3


def test_minilm_gives_token_features_with_mask():
    enc = text_encoders.TextEncoder("minilm")
    ctx, mask = enc(["a small red circle in the top left", ""])
    assert ctx.shape[0] == 2 and ctx.shape[2] == 384 and mask.shape == ctx.shape[:2]
    assert mask[0].sum() > mask[1].sum() == 2  # "" is [CLS] [SEP]
    assert enc.count_truncated(["word " * 200]) == 1


def test_local_folder_encoder_in_fp16_matches_minilm(tmp_path):
    """A folder saved by save_pretrained (here MiniLM halved to fp16, as carried to a GPU machine)
    loads through AutoModel, runs in float32 and gives MiniLM's features up to fp16 rounding."""
    halved = text_encoders.TextEncoder("minilm")
    halved.model.half().save_pretrained(tmp_path)
    halved.tokenizer.save_pretrained(tmp_path)
    ref = text_encoders.TextEncoder("minilm")
    local = text_encoders.TextEncoder(str(tmp_path))
    assert next(local.model.parameters()).dtype == torch.float32 and local.dim == 384
    captions = ["a small red circle in the top left", ""]
    (a, ma), (b, mb) = ref(captions), local(captions)
    assert torch.equal(ma, mb) and a.shape == b.shape
    assert (a - b).norm() / a.norm() < 5e-3  # fp16 weights: about 3 significant digits
    assert not torch.equal(a, b)  # it really is the fp16 copy that ran


def test_imagefolder_dataset(tiny, tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(20):
        mode = ("RGB", "RGBA", "L", "P")[i % 4]
        img = Image.new("RGB", (24 + i, 20), (10 * i, 255 - 10 * i, 128)).convert(mode)
        img.save(folder / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"a picture number {i % 5}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = [a for a in tiny if not a.startswith(("--dataset", "--batch_size"))]
    run_dir = td.main(
        args + [f"--dataset={folder}", "--batch_size=4", "--max_steps=3", f"--out_dir={tmp_path / 'out'}"]
    )
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["dataset"] == str(folder) and ckpt["step"] == 3


def test_images_become_rgb_squares_on_white():
    from PIL import Image

    transparent = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    out = image_data.to_rgb_square(transparent, 16)
    assert out.mode == "RGB" and out.size == (16, 16)
    assert image_data.pil_to_uint8(out).min() == 255  # fully transparent -> white
    gray16 = Image.new("I;16", (30, 30), 40000)
    assert image_data.to_rgb_square(gray16, 8).size == (8, 8)


def wandb_records(path):
    """The protobuf records of an offline W&B run file: a 7-byte header, then 32 KiB blocks of
    records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    data, pos, pending = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # too little room for a header: the block is padded
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            yield pending


def test_offline_wandb_run_holds_keys_and_image(tiny, tmp_path):
    from wandb.proto import wandb_internal_pb2

    args = [a for a in tiny if not a.startswith("--wandb_mode")]
    run_dir = td.main(
        args
        + [
            "--wandb_mode=offline",
            "--max_steps=4",
            "--log_interval=1",
            "--sample_interval=4",
            "--eval_interval=4",
            "--shapes_scenes=0.25",
            f"--out_dir={tmp_path}",
        ]
    )
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    keys, config = set(), set()
    for data in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        if rec.WhichOneof("record_type") == "run":  # the config travels with the run record
            config |= {item.key for item in rec.run.config.update}
        if rec.WhichOneof("record_type") == "config":  # and later changes as config records
            config |= {item.key for item in rec.config.update}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "val/loss"} <= keys, keys
    assert {"samples/_type", "samples/path", "samples/caption"} <= keys  # the image, stored flattened
    assert {"adherence/w3/seen/color", "adherence/w0/held_out/position"} <= keys
    assert {"scenes/w3/held_out/binding", "scenes/w0/seen/count", "scenes/w3/seen/position"} <= keys
    assert {"lr", "batch_size", "dataset", "text_encoder"} <= config, config
    assert glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "files", "media", "images", "samples_*.png"))


def test_override_errors_are_one_line_with_exit_code_2(run_script):
    for args, expected in (
        (["--nope=1"], "unknown key --nope"),
        (["--lr=fast"], "--lr=fast: expected a number"),
        (["--batch_size=1.5"], "expected an integer"),
        (["lr=1"], "write --key=value"),
        (["--device=gpu"], "--device=gpu is out of range: use one of auto, cuda, mps, cpu"),
    ):
        r = run_script(["train_diffusion.py", *args], timeout=120)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "valid keys" in run_script(["train_diffusion.py", "--nope=1"], timeout=120).stderr


def test_resume_after_sigint_matches_uninterrupted_run(read_log, root, tiny, tmp_path):
    common = tiny + [
        "--max_steps=40",
        "--log_interval=1",
        "--ckpt_interval=1000",
        "--eval_interval=1000",
        "--sample_interval=1000",
    ]
    ref_dir = td.main(common + [f"--out_dir={tmp_path / 'ref'}"])
    ref = {r["step"]: r["train/loss"] for r in read_log(ref_dir) if "train/loss" in r}

    out = tmp_path / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "train_diffusion.py", *common, f"--out_dir={out}"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        logs = glob.glob(str(out / "*" / "log.jsonl"))
        if logs and sum(1 for _ in open(logs[0])) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    (run_dir,) = glob.glob(str(out / "*"))
    k = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"]
    assert 8 <= k < 40

    td.main(common + [f"--out_dir={out}", "--resume=auto"])
    resumed = [r for r in read_log(run_dir) if "train/loss" in r][k:]  # the lines after the interruption
    assert [r["step"] for r in resumed] == list(range(k + 1, 41))
    for r in resumed:
        assert abs(r["train/loss"] - ref[r["step"]]) < 1e-4 * max(1.0, ref[r["step"]]), (r, ref[r["step"]])
