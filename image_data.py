"""
Images in and out: every dataset (a Hugging Face Hub dataset, a local `imagefolder`, the built-in
shapes) becomes uint8 images (N, 3, S, S) in memory plus one caption each, after checks that name
the problem in one line; sample grids go out as PNG files; and training's data (load_data) sits on
the device with its captions embedded, read in batches that depend on the step alone.
"""

import dataclasses
import io
import json
import os
import re
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import shapes
from configurator import UserError
from text_encoders import TextEncoder, embed_prompts, encode_captions

POKEMON_ID = "reach-vb/pokemon-blip-captions"  # a live mirror of lambdalabs/pokemon-blip-captions (gated upstream)


def to_rgb_square(img, size):
    """Any PIL image -> RGB (transparency composited on white), shorter side resized to `size`,
    center-cropped to size x size."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale down to 8 bits
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
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


# the metadata files `datasets` reads in an imagefolder, in any of its subfolders, and the image files it collects
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
KINDS = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list"}


def json_kind(value):
    return KINDS.get(type(value), "an object")


def check_imagefolder(path, caption_column):
    """Fail early, in one line, on the folder problems `datasets` reports obscurely, with the rules it
    applies (datasets' folder_based_builder): every metadata file in the tree is read, all of one
    format; a file name is a relative path that stays inside its metadata file's folder; each column
    (and each field inside lists and objects) keeps one JSON type over all lines of all files.
    Warns of lines that name a file twice (trained twice) and of images no line names (not trained)."""
    if not os.path.isdir(path):
        raise UserError(f"dataset folder {path} does not exist: pass --dataset=<folder with images and metadata.jsonl>")
    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise UserError(
            f'{path} has no metadata.jsonl: add one line per image, {{"file_name": ..., "{caption_column}": ...}}'
        )
    metas, images = [], set()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), path)
            if name in METADATA_NAMES:
                if not name.endswith(".jsonl"):
                    raise UserError(
                        f"{path} holds {rel} beside metadata.jsonl: `datasets` takes one metadata format: "
                        f"remove {rel} or move it out of the folder"
                    )
                metas.append(rel)
            elif name.lower().endswith(IMAGE_SUFFIXES):
                images.add(os.path.normpath(rel))
    kinds, rows, named, missing, first = {}, 0, {}, [], None
    for rel in metas:
        n, columns = check_metadata_file(path, rel, caption_column, kinds, named, missing)
        rows += n
        first = first or (rel, columns)
        if columns != first[1]:  # `datasets` refuses metadata files whose columns differ
            diff = sorted(k for k in set(columns) | set(first[1]) if columns.get(k) != first[1].get(k))[0]
            raise UserError(
                f"{path}: column {diff!r} is {first[1].get(diff, 'missing')} in {first[0]} but "
                f"{columns.get(diff, 'missing')} in {rel}: `datasets` needs the same columns and types in every "
                f"metadata file; make them alike"
            )
    if rows == 0:
        raise UserError(f"{meta} is empty: the dataset has no captioned images")
    if missing:
        raise UserError(
            f"{meta} names {len(missing)} image(s) that do not exist (first: {missing[0]}): "
            f"remove those lines or add the files"
        )
    twice = {f: lines for f, lines in named.items() if len(lines) > 1}
    if twice:  # legal, and `datasets` takes each line: say so, as the image is then trained twice as often
        f, lines = next(iter(twice.items()))
        print(
            f"warning: {meta} names {len(twice)} file on more than one line (first: {f}, lines "
            f"{', '.join(lines)}): each line is one training image",
            file=sys.stderr,
        )
    unnamed = sorted(images - set(named))
    if unnamed:
        print(
            f"warning: {len(unnamed)} image file(s) in {path} are named by no metadata line and are not used "
            f"(first: {unnamed[0]})",
            file=sys.stderr,
        )


def check_metadata_file(root, rel, caption_column, kinds, named, missing):
    """The lines of one metadata.jsonl (rel, inside root). kinds: column -> (JSON type, file, line
    first seen), shared by all files, as `datasets` needs one type per column; named: file -> its lines;
    missing: names of files that do not exist. Returns the number of lines and the file's columns with
    the type `datasets` would give each (null if only nulls)."""
    meta = os.path.join(root, rel)
    where_dir = os.path.dirname(meta)
    rows, signature = 0, {}

    def no_duplicate_keys(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:  # json keeps the last; `datasets` (pyarrow) refuses the line
            raise UserError(f"{meta} line {line_no} has the key {dup!r} twice: keep one")
        return dict(pairs)

    def same_kind(column, value, line_no):
        """One JSON type per column, recursively: `datasets` infers one Arrow type per column (null fits any)."""
        kind = json_kind(value)
        if kind != "null":
            first_kind, first_rel, first_line = kinds.setdefault(column, (kind, rel, line_no))
            if first_kind != kind:
                where = (
                    f"{meta}: column {column!r} is {first_kind} on line {first_line} but {kind} on line {line_no}"
                    if first_rel == rel
                    else f"{root}: column {column!r} is {first_kind} in {first_rel} but {kind} in {rel}"
                )
                raise UserError(f"{where}: `datasets` needs one type per column; make them alike (null for none)")
        if isinstance(value, list):
            for item in value:
                same_kind(column + "[]", item, line_no)
        elif isinstance(value, dict):
            for k, v in value.items():
                same_kind(f"{column}.{k}", v, line_no)

    def file_reference(column, name):
        """`datasets` opens file_name, *_file_name and the items of (*_)file_names relative to this folder."""
        if not isinstance(name, str):
            raise UserError(f"{meta} line {line_no}: {column!r} is {name!r}, not a file name: write the image's path")
        if not name:
            raise UserError(f"{meta} line {line_no}: {column!r} is empty: write the image's path")
        if "://" in name:
            raise UserError(f"{meta} line {line_no}: {column} {name!r} is a URL: copy the image into the folder")
        rel_name = os.path.normpath(name).replace("\\", "/")
        if os.path.isabs(name) or os.path.isabs(rel_name) or rel_name == ".." or rel_name.startswith("../"):
            raise UserError(
                f"{meta} line {line_no}: {column} {name!r} points outside {where_dir}: `datasets` only opens files "
                f"inside the metadata file's folder; copy the image in and name it relative to the folder"
            )
        full = os.path.join(where_dir, rel_name)
        if not os.path.isfile(full):
            missing.append(name)
        return os.path.normpath(os.path.relpath(full, root))

    with open(meta, "rb") as f:  # bytes: `datasets` fails on invalid UTF-8 deep inside its loader, we name the line
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as Windows editors write
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # an error, not a silent replacement: a caption with U+FFFD in it would train quietly on garbled text
                raise UserError(
                    f"{meta} line {line_no} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                    f"re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=no_duplicate_keys)
            except json.JSONDecodeError:
                raise UserError(f"{meta} line {line_no} is not valid JSON: fix or remove that line") from None
            if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
                raise UserError(
                    f"{meta} line {line_no} lacks 'file_name' or '{caption_column}': "
                    f"every line needs both (or pass --caption_column=<name>)"
                )
            if not isinstance(row[caption_column], (str, type(None))):  # `datasets` cannot mix text and numbers
                raise UserError(
                    f"{meta} line {line_no}: '{caption_column}' is {row[caption_column]!r}, not text: "
                    f'write a string ("" or null for no caption)'
                )
            for column, value in row.items():
                if column == "file_name" or column.endswith("_file_name"):
                    name = file_reference(column, value)
                    if column == "file_name":
                        named.setdefault(name, []).append(str(line_no))
                elif (column == "file_names" or column.endswith("_file_names")) and isinstance(value, list):
                    for item in value:
                        file_reference(column, item)
                same_kind(column, value, line_no)
                # `datasets` compares the column types of every metadata file: ints and floats count apart there
                seen, now = signature.get(column, "null"), "float" if isinstance(value, float) else json_kind(value)
                if seen == "null" or (seen == "a number" and now == "float"):
                    signature[column] = now
            rows += 1
    return rows, signature


def load_image_dataset(C):
    """Returns (images uint8 (N, 3, S, S), captions, name, mirrorable (N,) bool) for the dataset that config C names."""
    if C.dataset == "shapes":
        images, captions, _ = shapes.make_shapes_dataset(
            C.shapes_num_images, C.image_size, seed=C.seed, captions=C.shapes_captions, scenes=C.shapes_scenes
        )
        # positions name sides (top left, ...); the centered ones stay unflipped too, as every shapes result was trained
        return images, captions, "shapes", torch.zeros(len(captions), dtype=torch.bool)
    import datasets

    name = POKEMON_ID if C.dataset == "pokemon" else C.dataset
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        check_imagefolder(os.path.expanduser(name), C.caption_column)
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=os.path.expanduser(name), split="train")
        except Exception as e:  # a rule of `datasets` the checks above do not know yet: its own words, in one line
            while e.__cause__ or e.__context__:  # DatasetGenerationError wraps the error that says what is wrong
                e = e.__cause__ or e.__context__
            raise UserError(
                f"`datasets` could not read the folder {name} ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                f"fix the folder or its metadata.jsonl"
            ) from None
    else:
        try:
            ds = datasets.load_dataset(name, split="train")
        except OSError as e:  # no such dataset, or the Hub is offline (ConnectionError): a typo'd folder lands here too
            raise UserError(
                f"dataset {name} is not a folder here and could not be loaded from the Hub "
                f"({str(e).splitlines()[0][:150]}): pass --dataset=shapes, a folder with metadata.jsonl, "
                f"or a reachable Hub dataset id"
            ) from None
    for col in (C.image_column, C.caption_column):
        if col not in ds.column_names:
            raise UserError(
                f"dataset {name} has no column {col!r} (it has {ds.column_names}): "
                f"pass --image_column=... and --caption_column=..."
            )
    # decode ourselves: a bad file is skipped, not fatal
    ds = ds.cast_column(C.image_column, datasets.Image(decode=False))
    images, captions, skipped, first_skip = [], [], 0, None
    for i, row in enumerate(tqdm(ds, desc=f"preprocessing {name}", leave=False)):
        data = row[C.image_column]
        try:
            # PIL warns above 89 Mpx (and refuses above 179 Mpx); we reject above 64 Mpx below
            with warnings.catch_warnings():
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
                # Hub rows may hold bytes only, or None
                where = os.path.basename((data or {}).get("path") or f"row {i}")
                first_skip = f"{where}: {' '.join(str(e).split())[:150]}"
            continue
        caption = row[C.caption_column]
        captions.append(caption if isinstance(caption, str) else "")
    total = len(images) + skipped
    if skipped:
        print(
            f"warning: skipped {skipped} of {total} images that could not be read or have an unusable size "
            f"(first: {first_skip})",
            file=sys.stderr,
        )
    if len(images) < 0.5 * total or not images:
        raise UserError(f"{name}: {skipped} of {total} images could not be read (first: {first_skip}): check the files")
    n_empty = sum(c == "" for c in captions)
    if n_empty:  # legal (that is what caption dropout trains), but usually a sign of the wrong --caption_column
        print(
            f"warning: {n_empty} of {len(captions)} captions are empty: those images only train "
            "the unconditional model",
            file=sys.stderr,
        )
    return torch.stack(images), captions, name, mirrorable(captions)


def split_indices(n, seed, val_fraction, eval_images):
    """(val_idx, train_idx) of n images: one fixed permutation by `seed`, whose first
    max(1, min(eval_images, n * val_fraction)) images are held out. The training script and the
    quality benchmark both split this way, so they agree on which art was never trained on."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, min(eval_images, int(n * val_fraction)))
    return perm[:n_val], perm[n_val:]


def load_art(folder, image_size, seed, val_fraction, eval_images):
    """A captioned imagefolder split as train_diffusion.py splits it: (train images, train captions,
    held-out images, held-out captions), uint8 at image_size. For benchmarks and figures."""
    C = SimpleNamespace(dataset=folder, image_column="image", caption_column="text", image_size=image_size)
    images, captions, _, _ = load_image_dataset(C)
    val_idx, train_idx = split_indices(len(images), seed, val_fraction, eval_images)
    pick = lambda idx: [captions[i] for i in idx.tolist()]
    return images[train_idx], pick(train_idx), images[val_idx], pick(val_idx)


# "left"/"right" as a side: after "the", a corner word or a possessive ("on the left", "top-left",
# "its right arm"), before "side", "hand", "half", "corner" or a colon ("Right: a dog"). Not the verb or
# the adverb of Pokédex prose ("nothing left but scraps", "just left its nest", "right after takeoff").
SIDE = re.compile(
    r"\b(?:the|top|bottom|upper|lower|far|its|his|her|their|your|my)[\s-]+(?:left|right)\b"
    r"|\b(?:left|right)(?:[\s-]*(?:side|hand|handed|half|corner)\b|\s*:)",
    re.IGNORECASE,
)


def mirrorable(captions):
    """(N,) bool: which images a horizontal flip leaves true to their caption. Pokémon art and most
    captioned photos read the same mirrored; a caption that names a side does not (Clawitzer's
    "Its right arm is packed with meat"), so only that image is never flipped."""
    return torch.tensor([SIDE.search(c) is None for c in captions], dtype=torch.bool)


def save_grid(images, path, nrow=8):
    """images in [-1, 1], (B, 3, H, W) -> one PNG."""
    from torchvision.utils import save_image

    try:
        save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)
    except OSError as e:  # a full or read-only disk: the images drawn so far are lost, the files written are not
        raise UserError(f"could not write {path} ({e.strerror or e}): free space or pass another --out_dir") from None


# -----------------------------------------------------------------------------
# Training data: images on the device, every distinct caption embedded once, batches by step


@dataclasses.dataclass
class Data:
    """What a run trains and evaluates on, built once by load_data. Images stay uint8 (N, 3, S, S);
    captions are rows of one table of embedded captions, row 0 the empty caption."""

    name: str  # the dataset, as banners and checkpoints name it
    context_dim: int  # the width of the text encoder's token embeddings
    ctx_table: torch.Tensor  # (R, L, context_dim) every distinct caption, embedded; on the device
    ctx_mask: torch.Tensor  # (R, L) bool, its tokens
    train_images: torch.Tensor  # (N, 3, S, S) uint8, on the device (small datasets)
    train_rows: torch.Tensor  # (N,) each image's caption row
    train_can_flip: torch.Tensor  # (N,) bool: which images random flips may mirror
    val_images: torch.Tensor  # (V, 3, S, S) uint8, on the CPU: held out, for the validation loss and KID
    val_rows: torch.Tensor  # (V,)
    sample_prompts: list  # the fixed captions of the sample grids
    sample_cond: tuple  # (context, mask) of sample_prompts
    sample_uncond: tuple  # (context, mask) of the empty caption, padded alike
    judge_prompts: list | None = None  # shapes only: the judge's prompts (shapes.eval_prompts())
    judge_cond: tuple | None = None  # shapes only: (cond, uncond) of judge_prompts, as sample_cond and sample_uncond
    scene_prompts: list | None = None  # shapes with scenes only: shapes.scene_prompts()
    scene_cond: tuple | None = None  # (cond, uncond) of scene_prompts
    train_short_rows: torch.Tensor | None = None  # (N, CAPTION_VARIANTS) shortened captions' rows (caption_parts > 0)


# How many shortened versions of each training caption the caption table holds (caption_parts > 0)
CAPTION_VARIANTS = 6


def caption_parts(caption):
    """The parts a caption is cut into: after each , . ; : ! or ? that ends a word.
    'Bulbasaur, a grass type seed pokemon. It naps.' -> ['Bulbasaur,', 'a grass type seed pokemon.', 'It naps.']"""
    return [part for part in re.split(r"(?<=[,.;:!?])\s+", caption.strip()) if part]


def without_name(caption):
    """The caption without its first part: in pokedex-art the name ('Bulbasaur,'), a word that fits one
    image and that a held-out Pokémon's caption never shares with the training captions. A caption of one
    part stays itself (an empty caption would be the unconditional one)."""
    parts = caption_parts(caption)
    return " ".join(parts[1:]) if len(parts) > 1 else caption


def shortened_captions(captions, k, seed, cut="random"):
    """k shortened versions of each caption. cut="random": each keeps every part with probability 1/2 (in order,
    at least one part); cut="first": all k drop the first part only (in pokedex-art the name, which fits one image
    and is never seen again in a held-out caption). A caption of one part stays itself. Seeded: every rank and
    every resume builds the same."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for caption in captions:
        if cut == "first":
            out.append([without_name(caption)] * k)
            continue
        parts = caption_parts(caption)
        if not parts:  # nothing to cut
            out.append([caption] * k)
            continue
        versions = []
        for _ in range(k):
            keep = torch.rand(len(parts), generator=g) < 0.5
            if not keep.any():  # an empty caption is the unconditional one: keep one part instead
                keep[torch.randint(len(parts), (), generator=g)] = True
            versions.append(" ".join(p for p, kept in zip(parts, keep.tolist()) if kept))
        out.append(versions)
    return out


def load_data(C, sysinfo):
    """Images, the caption table and the fixed prompts for sample grids and the judge."""
    images, captions, name, can_flip = load_image_dataset(C)
    encoder = TextEncoder(C.text_encoder, sysinfo.device)
    n_cut = encoder.count_truncated(captions)
    if sysinfo.master and n_cut:
        print(f"warning: {n_cut} captions are longer than {encoder.max_length} tokens and were cut", file=sys.stderr)
    val_idx, train_idx = split_indices(len(images), C.seed, C.val_fraction, C.eval_images)
    short = []  # the training captions' shortened versions, (N_train x CAPTION_VARIANTS) flattened
    if C.caption_parts > 0:
        versions = shortened_captions(
            [captions[i] for i in train_idx.tolist()], CAPTION_VARIANTS, C.seed, C.caption_cut
        )
        short = [v for vs in versions for v in vs]
    ctx_table, ctx_mask, all_rows = encode_captions(encoder, captions + short)
    rows = all_rows[: len(captions)]
    short_rows = all_rows[len(captions) :].view(-1, CAPTION_VARIANTS) if short else None
    if len(train_idx) // sysinfo.world < C.batch_size:
        raise UserError(
            f"batch_size {C.batch_size} is larger than the {len(train_idx) // sysinfo.world} training images "
            f"per process: lower --batch_size"
        )
    dev = sysinfo.device
    # fixed prompts for sample grids: the judge's prompts on shapes, validation captions elsewhere
    judge_prompts = judge_cond = scene_prompts = scene_cond = None
    if C.dataset == "shapes":
        judge_prompts = shapes.eval_prompts()
        judge_cond = embed_prompts(encoder, [p["caption"] for p in judge_prompts], dev)
        sample_prompts = [p["caption"] for p in judge_prompts][:16]
        if C.shapes_scenes > 0:
            scene_prompts = shapes.scene_prompts()
            scene_cond = embed_prompts(encoder, [p["caption"] for p in scene_prompts], dev)
            # half the grid two-object prompts: 4 never-seen pairings, each beside its swap seen in training
            sample_prompts = sample_prompts[:8] + [p["caption"] for p in scene_prompts[:32:4]]
    else:
        sample_prompts = [captions[i] for i in val_idx[:8].tolist()]
    sample_cond, sample_uncond = embed_prompts(encoder, sample_prompts, dev)
    return Data(
        name=name,
        context_dim=encoder.dim,
        ctx_table=ctx_table.to(dev),
        ctx_mask=ctx_mask.to(dev),
        train_images=images[train_idx].to(dev),
        train_rows=rows[train_idx].to(dev),
        train_can_flip=(can_flip[train_idx] & C.flips).to(dev),
        train_short_rows=None if short_rows is None else short_rows.to(dev),
        val_images=images[val_idx],
        val_rows=rows[val_idx],
        sample_prompts=sample_prompts,
        sample_cond=sample_cond,
        sample_uncond=sample_uncond,
        judge_prompts=judge_prompts,
        judge_cond=judge_cond,
        scene_prompts=scene_prompts,
        scene_cond=scene_cond,
    )


def to_model_range(images):
    """Stored uint8 images -> the model's float range [-1, 1]: for training batches and evaluation alike."""
    return images.float() / 127.5 - 1


def global_batch_indices(step, n, global_batch, seed):
    """The image indices of global batch `step`: each epoch is one permutation of the training set
    cut into global batches; under torchrun rank r trains on slice r of it. A pure function of the
    step, so a resumed run replays the same data, and N ranks see what one process would."""
    steps_per_epoch = n // global_batch
    epoch, pos = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * global_batch : (pos + 1) * global_batch]


def shifted_timesteps(u, shift, num_timesteps):
    """Timesteps from u uniform on [0, 1), warped toward the noisy end by `shift` s: t / T = s u / (1 + (s - 1) u),
    the shift Esser et al. (2024) apply to their schedule at higher resolutions. s = 1 is uniform; s = 3 puts
    half the timesteps above 3T/4. Its CDF, P(t / T <= x) = x / (s - (s - 1) x), is what tests check."""
    warped = shift * u / (1 + (shift - 1) * u)
    return (warped * num_timesteps).long().clamp(max=num_timesteps - 1)


def get_batch(data, step, seed, rank, world, batch_size, p_uncond, num_timesteps, p_short=0.0, t_shift=1.0):
    """Rank `rank`'s slice of training batch `step`: (x0, context, mask, t, noise). Every random draw
    (caption dropout, flips, timesteps, noise, then with p_short > 0 which captions are shortened and to
    which version) is made for the global batch from (seed, step), in that order, and each rank takes its
    slice: a resumed run replays the same batches, and N ranks see what one process would. Timesteps are
    uniform, or with t_shift != 1 drawn by shifted_timesteps. On CUDA the draws come from the GPU's generator,
    elsewhere the CPU's."""
    dev = data.train_images.device
    rng_dev = dev if dev.type == "cuda" else torch.device("cpu")  # on mps the step's draws come from the CPU
    G, B = batch_size * world, batch_size  # global and per-rank batch
    g = torch.Generator(device=rng_dev).manual_seed(seed * 1_000_003 + step)
    drop = (torch.rand(G, generator=g, device=rng_dev) < p_uncond).to(dev)
    flip = (torch.rand(G, generator=g, device=rng_dev) < 0.5).to(dev)
    if t_shift == 1:
        t = torch.randint(0, num_timesteps, (G,), generator=g, device=rng_dev).to(dev)
    else:
        u = torch.rand(G, generator=g, device=rng_dev, dtype=torch.float64)
        t = shifted_timesteps(u, t_shift, num_timesteps).to(dev)
    noise = torch.randn((G, *data.train_images.shape[1:]), generator=g, device=rng_dev).to(dev)
    mine = slice(rank * B, (rank + 1) * B)
    idx = global_batch_indices(step, len(data.train_images), G, seed)[mine].to(dev)
    x0 = to_model_range(data.train_images[idx])  # (B, 3, S, S)
    x0 = torch.where((flip[mine] & data.train_can_flip[idx])[:, None, None, None], x0.flip(3), x0)
    rows = data.train_rows[idx]
    if p_short > 0:
        K = data.train_short_rows.shape[1]
        shorten = (torch.rand(G, generator=g, device=rng_dev) < p_short).to(dev)
        version = torch.randint(0, K, (G,), generator=g, device=rng_dev).to(dev)
        rows = torch.where(shorten[mine], data.train_short_rows[idx, version[mine]], rows)
    rows = torch.where(drop[mine], 0, rows)  # caption dropout: row 0 is the empty caption
    return x0, data.ctx_table[rows], data.ctx_mask[rows], t[mine], noise[mine]
