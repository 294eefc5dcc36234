"""
Checkpoints: written atomically (a crash never leaves a broken ckpt.pt), read with
weights_only=True (a file that would run code is refused unread), found in a run folder or an
out_dir, and turned back into a U-Net and its noise schedule without the training script.
"""

import contextlib
import os

import torch

from configurator import UserError
from diffusion_model import NoiseScheduler, UNet, UNetConfig

CKPT_NAME = "ckpt.pt"


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old
    checkpoint: a crash or a full disk at any moment leaves the previous checkpoint intact."""
    weights = [v for part in ("model", "ema") for v in state.get(part, {}).values() if torch.is_floating_point(v)]
    # never replace a good checkpoint by a diverged one
    if weights and not all(torch.isfinite(w).all() for w in weights):
        raise UserError(
            f"the weights at step {state.get('step')} are NaN or inf: checkpoint not written, the previous "
            f"{path} is kept. Lower --lr or raise --warmup_steps"
        )
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
            raise UserError(
                f"could not write checkpoint {path} ({e.strerror or e}): the previous checkpoint is kept; "
                f"free space and resume with --resume=auto"
            ) from None
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
        raise UserError(
            f"checkpoint {path} does not exist: train one with train_diffusion.py "
            "or pass --checkpoint=<file or run folder>"
        )
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): use another checkpoint")
    # torch.save writes a zip archive whose index sits at the end: a file cut short, random bytes or a bare
    # pickle is not one, and is refused before any byte of it is unpickled
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path} is not a checkpoint written by torch.save (truncated, or another kind of file): "
            f"pass a ckpt.pt written by train_diffusion.py"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming the refused object is the useful one
        lines = str(e).splitlines()
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise UserError(
            f"{path} holds objects other than tensors and was refused unread ({why.strip()[:150]}): "
            f"only load checkpoints you trust, written by train_diffusion.py"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(
            f"{path} is not a readable checkpoint (truncated or not a torch file: {str(e).splitlines()[0][:120]})"
        ) from None
    # what sampling and resuming read
    needed = ("model", "model_args", "step", "num_timesteps", "prediction_type", "text_encoder", "dataset")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise UserError(
            f"{path} is not a checkpoint of this repo (it lacks {', '.join(needed)}): "
            f"pass a ckpt.pt written by train_diffusion.py"
        )
    return ckpt


def build_model(ckpt, weights="ema"):
    """Rebuild the U-Net from a checkpoint's model_args and load its (EMA) weights."""
    try:
        cfg = UNetConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise UserError(
            f"checkpoint model_args are invalid ({e}): the checkpoint is damaged or from another version"
        ) from None
    model = UNet(cfg)
    try:
        model.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)[:200]
        raise UserError(
            f"checkpoint weights do not fit its model_args ({first}): the checkpoint is damaged or edited"
        ) from None
    return model


def build_scheduler(ckpt):
    """The noise schedule and prediction target a checkpoint was trained with."""
    return NoiseScheduler(ckpt["num_timesteps"], ckpt["prediction_type"])
