"""The seed's own path, proven without the network (issue 15). The design's run reads Pokémon rows
from the Hub and CLIP's text tower; offline tests otherwise only ever see shapes and MiniLM. Here
the real code runs on local stand-ins built by the tests: a tiny random CLIP text tower with a BPE
vocabulary of the captions' words (text_encoders' CLIP branch), and rows shaped like the Pokémon
mirror's, PNG bytes and captions, served by a patched `datasets.load_dataset` (image_data's Hub branch)."""

import collections
import io
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import configurator
import image_data
import sample_diffusion as sd
import text_encoders
import train_diffusion as td

# Every word of the shapes captions (templates, synonyms, the judge's canonical and novel prompts)
# and of the Hub rows below: the tiny CLIP reads each as one token, none as <|endoftext|> (its unk).
WORDS = (
    "a an and at big blue bottom center centre circle corner draw green image in is it large left little lower me "
    "middle of one orange picture placed purple red right show sits size small square that the there top triangle "
    "upper yellow pokemon with white black tail wings bird fish cartoon drawing"
).split() + [",", ":", "-"]
CLIP_WIDTH = 32
PNG_SIZE = 16  # --image_size of the Hub runs: a multiple of 8, as the recipe's three halvings need


def learn_bpe(words):
    """A byte-pair merge list under which each word is one token: merge the most frequent adjacent
    pair of symbols until every word is one symbol, CLIP style (the last symbol ends in </w>)."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    symbols, merges = sorted({s for seq in seqs for s in seq}), []
    while any(len(seq) > 1 for seq in seqs):
        pairs = collections.Counter(p for seq in seqs for p in zip(seq, seq[1:]))
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = []
        for seq in seqs:
            out, i = [], 0
            while i < len(seq):
                if seq[i : i + 2] == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged
    return symbols, merges


def save_tiny_clip(folder, width, seed=0):
    """A CLIPTokenizer from vocab.json + merges.txt, and a random CLIPTextModel of `width`, saved
    together by save_pretrained (safetensors) into `folder`, as a downloaded CLIP folder is."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols, merges = learn_bpe(WORDS)
    vocab = list(dict.fromkeys(["<|startoftext|>", "<|endoftext|>", *symbols, *("".join(m) for m in merges)]))
    src = os.path.join(folder, "bpe")
    os.makedirs(src)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(src, model_max_length=77)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    CLIPTextModel(cfg).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(src)  # the folder holds what save_pretrained wrote, nothing else
    return str(folder)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), CLIP_WIDTH)


# ----------------------------------------------------------------------------- the Hub rows

RED, GREEN, BLUE = (200, 30, 40), (10, 200, 30), (20, 40, 220)
LONG_CAPTION = "a black bird with white wings " * 14  # 84 words: 86 tokens, more than CLIP's 77
CAPTIONS = [
    "a red pokemon with a white tail",
    "a green cartoon bird",
    "a blue fish",
    "a black and white drawing",
    LONG_CAPTION,
    "a drawing of a pokemon",
]


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **({"transparency": 0} if img.mode == "P" else {}))
    return buf.getvalue()


def hub_images():
    from PIL import Image

    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # right half: fully transparent blue
    rgba.paste(Image.new("RGBA", (16, 32), RED + (255,)), (0, 0))  # left half: opaque red
    pal = Image.new("P", (16, 16), 0)  # palette index 0 is black and, by the transparency entry, transparent
    pal.putpalette([0, 0, 0, *GREEN] + [0, 0, 0] * 254)
    pal.paste(1, (0, 0, 16, 8))  # top half: opaque green
    wide = Image.new("RGB", (32, 16), GREEN)  # 2:1, green at both ends: the center crop keeps only the blue
    wide.paste(BLUE, (8, 0, 24, 16))
    half = Image.new("RGBA", (16, 16), (0, 0, 0, 128))  # black at half opacity over white
    plain = [Image.new("RGB", (24, 24), (30 * i, 100, 200 - 30 * i)) for i in range(2)]
    return [rgba, pal, wide, half, *plain]


@pytest.fixture(scope="session")
def hub_rows():
    """A datasets.Dataset with the Pokémon mirror's features: `image` (datasets.Image, PNG bytes) and `text`."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png(im), "path": None} for im in hub_images()], "text": CAPTIONS}, features=features
    )


@pytest.fixture
def hub(hub_rows, monkeypatch):
    """datasets.load_dataset answers with the rows, as the Hub would for the mirror; returns its calls."""
    import datasets

    calls = []

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return hub_rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def error_lines(stderr):
    """stderr's lines, less the progress bar transformers draws while it loads the encoder's weights
    (its output, not the script's: the encoder loads before the width check can refuse)."""
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("Loading weights")]


def hub_config(**over):
    return SimpleNamespace(
        **{
            **dict(
                dataset="pokemon",
                image_column="image",
                caption_column="text",
                image_size=PNG_SIZE,
                seed=0,
                shapes_num_images=64,
                shapes_captions="varied",
            ),
            **over,
        }
    )


# ----------------------------------------------------------------------------- 1. the CLIP branch


def test_tiny_clip_reads_every_caption_word_as_one_token(clip_folder):
    """The stand-in is only as good as its vocabulary: a word outside it would be <|endoftext|> (unk)
    and the runs below would train on half-empty captions without saying so."""
    import shapes

    enc = text_encoders.TextEncoder(clip_folder)
    assert type(enc.tokenizer).__name__ == "CLIPTokenizer" and type(enc.model).__name__ == "CLIPTextModel"
    assert enc.dim == CLIP_WIDTH and enc.max_length == 77
    ids = enc.tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 and i[0] != enc.tokenizer.unk_token_id for i in ids), [
        w for w, i in zip(WORDS, ids) if len(i) != 1
    ]
    _, train_captions, _ = shapes.make_shapes_dataset(64, 16, seed=0, captions="varied")
    judged = [p["caption"] for wording in ("canonical", "novel") for p in shapes.eval_prompts(wording)]
    for caption in train_captions + judged + CAPTIONS:
        inner = enc.tokenizer(caption)["input_ids"][1:-1]
        assert enc.tokenizer.unk_token_id not in inner, caption


def test_clip_mask_is_the_tokenizers_attention_mask_and_long_captions_are_cut(clip_folder):
    enc = text_encoders.TextEncoder(clip_folder)
    captions = ["a small red circle in the top left", "a big blue square", ""]
    ctx, mask = enc(captions)
    ref = enc.tokenizer(captions, padding="longest", return_tensors="pt")["attention_mask"].bool()
    assert torch.equal(mask, ref)
    assert mask.sum(1).tolist() == [10, 6, 2]  # the words between <|startoftext|> and <|endoftext|>
    assert ctx.shape == (3, 10, CLIP_WIDTH) and ctx.dtype == torch.float32
    assert mask[1, :6].all() and not mask[1, 6:].any() and not mask[2, 2:].any()  # padding is False, at the end
    # the padding changes nothing a caption's own tokens say
    alone, _ = enc(captions[1:2])
    torch.testing.assert_close(ctx[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    # cut at 77 tokens with the special ones: 75 words fit exactly, 76 do not
    assert enc.count_truncated(["red " * 75, "red " * 76, "a red circle"]) == 1
    ctx, mask = enc(["red " * 100, "a red circle"])
    assert ctx.shape[1] == 77 and mask[0].all() and mask[1].sum() == 5
    assert (
        enc.tokenizer(["red " * 100], truncation=True, max_length=77)["input_ids"][0][-1] == enc.tokenizer.eos_token_id
    )


@pytest.fixture(scope="module")
def clip_run(small, clip_folder, tmp_path_factory):
    """A 2-step shapes run whose text encoder is the tiny CLIP, named by a relative path."""
    out = tmp_path_factory.mktemp("clip_run")
    return td.main(small(text_encoder=os.path.relpath(clip_folder), max_steps=2, out_dir=out))


def test_clip_run_records_its_encoder_and_sampling_loads_it(clip_run, clip_folder, tmp_path, monkeypatch, capsys):
    ckpt = checkpoints.load_checkpoint(os.path.join(clip_run, "ckpt.pt"))
    # stored absolute: sampling from another working directory still finds the folder
    assert ckpt["text_encoder"] == clip_folder and os.path.isabs(ckpt["text_encoder"])
    assert ckpt["config"]["text_encoder"] == clip_folder and ckpt["step"] == 2
    assert ckpt["model_args"]["context_dim"] == CLIP_WIDTH

    loaded = []
    real = sd.TextEncoder

    def spy(name, device="cpu"):
        loaded.append(name)
        return real(name, device)

    monkeypatch.setattr(sd, "TextEncoder", spy)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples"
    sd.main(
        [
            f"--checkpoint={clip_run}",
            "--sampler=ddim",
            "--steps=2",
            "--num_images=1",
            "--device=cpu",
            "--condition=" + "a red circle " * 30,
            f"--out_dir={out}",
        ]
    )  # 90 words: cut at 77 tokens
    assert loaded == [clip_folder]
    captured = capsys.readouterr()
    assert f"text encoder {clip_folder}" in captured.out
    assert captured.err.count("the prompt is longer than 77 tokens and was cut") == 1, captured.err
    assert sorted(os.listdir(out)) == ["generated_image_pokemon.png", "generated_image_pokemon_cfg.png"]
    from PIL import Image

    assert all(Image.open(out / name).size == (16, 16) for name in os.listdir(out))


def test_sampling_refuses_a_clip_of_another_width_in_one_line(clip_run, clip_folder, tmp_path, capsys):
    """The checkpoint names a folder; if that folder later holds another CLIP (here 48-d instead of
    32-d), sampling must refuse in one line rather than fail inside the U-Net's cross-attention."""
    folder = tmp_path / "encoder"
    shutil.copytree(clip_folder, folder)
    ckpt = torch.load(os.path.join(clip_run, "ckpt.pt"), weights_only=True)
    ckpt["text_encoder"] = str(folder)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    args = [f"--checkpoint={tmp_path / 'ckpt.pt'}", "--sampler=ddim", "--steps=1", "--num_images=1", "--device=cpu"]
    sd.main(args + [f"--out_dir={tmp_path / 'before'}"])  # the same encoder in the folder: samples
    assert len(os.listdir(tmp_path / "before")) == 2

    shutil.rmtree(folder)
    save_tiny_clip(folder, 48, seed=1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        configurator.run_cli(sd.main, args + [f"--out_dir={tmp_path / 'after'}"])
    assert e.value.code == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"text encoder {folder} gives 48-d tokens" in err[0] and "32-d" in err[0], err
    assert not (tmp_path / "after").exists()  # refused before anything was written


def test_resume_with_another_text_encoder_is_refused_in_one_line(
    clip_run, clip_folder, small, train_in_process, tmp_path, capsys
):
    before = sorted(os.listdir(clip_run))
    args = [*small(text_encoder="minilm", max_steps=4, out_dir=tmp_path), f"--resume={clip_run}"]
    with pytest.raises(SystemExit) as e:
        configurator.run_cli(train_in_process, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--text_encoder=minilm differs from the resumed run's {clip_folder}" in err[0], err
    assert sorted(os.listdir(clip_run)) == before  # no lock left, nothing written
    assert checkpoints.load_checkpoint(os.path.join(clip_run, "ckpt.pt"))["step"] == 2


# ----------------------------------------------------------------------------- 2. the Hub rows


def test_hub_rows_are_decoded_composited_on_white_resized_and_cropped(hub):
    images, captions, name, can_flip = image_data.load_image_dataset(hub_config())
    assert hub == [(image_data.POKEMON_ID, "train")]
    assert name == image_data.POKEMON_ID and captions == CAPTIONS and can_flip.all()  # no caption names a side
    assert images.dtype == torch.uint8 and images.shape == (len(CAPTIONS), 3, PNG_SIZE, PNG_SIZE)
    px = images.permute(0, 2, 3, 1)  # (N, S, S, 3)
    rgba, pal, wide, half = px[0], px[1], px[2], px[3]
    # RGBA 32 px halved: red stays red, the transparent blue becomes white (bicubic blends the two middle columns)
    assert (rgba[:, :6] == torch.tensor(RED, dtype=torch.uint8)).all() and (rgba[:, 9:] == 255).all()
    # a palette image with a transparency entry: its transparent black is white, its green kept
    assert (pal[:8] == torch.tensor(GREEN, dtype=torch.uint8)).all() and (pal[8:] == 255).all()
    assert (wide == torch.tensor(BLUE, dtype=torch.uint8)).all()  # the center square of a 2:1 image
    assert (half == 127).all()  # black at alpha 128 over white: 255 * 127 / 255
    assert (px[4] == torch.tensor((0, 100, 200), dtype=torch.uint8)).all()  # an ordinary RGB image, unchanged


def test_hub_rows_without_the_caption_column_are_one_line_error(hub):
    with pytest.raises(configurator.UserError) as e:
        image_data.load_image_dataset(hub_config(caption_column="caption"))
    msg = str(e.value)
    assert "\n" not in msg and "has no column 'caption'" in msg and "['image', 'text']" in msg, msg
    assert "--caption_column" in msg


def test_auto_when_the_hub_answers_trains_pokemon_with_clip(
    hub, clip_folder, small, train_in_process, tmp_path, monkeypatch, capsys
):
    asked = []
    monkeypatch.setattr(td, "hub_reachable", lambda *a, **k: asked.append(1) or True)  # the Hub "answers", unasked
    # resolve_text_encoder reads text_encoders.CLIP_ID when called: `auto` becomes the tiny CLIP
    monkeypatch.setattr(text_encoders, "CLIP_ID", clip_folder)
    run_dir = train_in_process(
        small(dataset="auto", text_encoder="auto", image_size=0, batch_size=2, max_steps=2, out_dir=tmp_path)
    )
    assert asked == [1] and hub == [(image_data.POKEMON_ID, "train")]
    ckpt = checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    assert ckpt["dataset"] == image_data.POKEMON_ID and ckpt["config"]["dataset"] == "pokemon"
    assert ckpt["text_encoder"] == clip_folder and ckpt["model_args"]["context_dim"] == CLIP_WIDTH
    assert ckpt["model_args"]["image_size"] == 64 and ckpt["step"] == 2  # image_size 0: the Hub datasets' default
    err = capsys.readouterr().err
    assert "cannot be reached" not in err  # no offline banner
    assert "warning: 1 captions are longer than 77 tokens and were cut" in err, err


# ----------------------------------------------------------------------------- 3. the GPU recipe's code path


def test_gpu_recipe_runs_on_cpu(hub, clip_folder, root, train_in_process, tmp_path):
    """config/pokemon_gpu.py as written (Pokémon, the 128-channel 4-level U-Net, v-prediction) at the
    smallest size its three halvings allow, two steps of two images, with the tiny CLIP."""
    run_dir = train_in_process(
        [
            os.path.join(root, "config", "pokemon_gpu.py"),
            f"--image_size={PNG_SIZE}",
            "--max_steps=2",
            "--batch_size=2",
            "--device=cpu",
            "--wandb_mode=disabled",
            "--eval_interval=1000",
            "--sample_interval=1000",
            "--steps=2",
            f"--out_dir={tmp_path}",
            f"--text_encoder={clip_folder}",
        ]
    )
    assert hub == [(image_data.POKEMON_ID, "train")]
    path = os.path.join(run_dir, "ckpt.pt")
    try:
        ckpt = checkpoints.load_checkpoint(path)
    finally:
        os.remove(path)  # 1.8 GB (weights, EMA, AdamW state): not left behind in pytest's kept temporary folders
    args = ckpt["model_args"]
    assert (args["base_channels"], tuple(args["channel_mults"]), tuple(args["attention_levels"])) == (
        128,
        (1, 2, 2, 4),
        (1, 2, 3),
    )
    assert args["num_res_blocks"] == 2 and args["pos_embed"] is True and args["coord_conv"] is False
    assert args["context_dim"] == CLIP_WIDTH and args["image_size"] == PNG_SIZE
    # the recipe's U-Net: 120.4 M parameters with CLIP's 512-d tokens, 114.9 M with the tiny CLIP's 32-d ones
    assert 110e6 < sum(v.numel() for v in ckpt["model"].values()) < 125e6
    assert ckpt["prediction_type"] == "v" and ckpt["dataset"] == image_data.POKEMON_ID and ckpt["step"] == 2
    assert ckpt["config"]["lr"] == 2e-4 and ckpt["config"]["warmup_steps"] == 500  # the recipe's, not the CPU recipe's
    assert os.path.isfile(os.path.join(run_dir, "samples_0000002.png"))
