"""
Checkpoints: written atomically (a crash never leaves a broken ckpt.pt), read with
weights_only=True (a file that would run code is refused unread), found in a run folder or an
out_dir, and turned back into a U-Net and its noise schedule without the training script. Also the
run folder they live in, and its lock: one process writes a run.
"""

import contextlib
import dataclasses
import os
import socket
import sys
import time
from datetime import datetime

import torch

from configurator import UserError
from diffusion_model import NoiseScheduler, UNet, UNetConfig
from distributed import gather_rng

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


def checkpoint_state(C, M, D, step, sysinfo, wandb_run):
    """What ckpt.pt holds. Collective under torchrun: every rank must call it."""
    rng = dict(
        torch=gather_rng(sysinfo, torch.get_rng_state()),
        cuda=gather_rng(sysinfo, torch.cuda.get_rng_state(sysinfo.device)) if sysinfo.device.type == "cuda" else [],
    )
    return dict(
        model=M.model.state_dict(),
        ema=M.ema.state_dict(),
        optimizer=M.optimizer.state_dict(),
        step=step,
        model_args=dataclasses.asdict(M.cfg),
        num_timesteps=C.num_timesteps,
        prediction_type=C.prediction_type,
        text_encoder=C.text_encoder,
        dataset=D.name,
        config=vars(C),
        wandb_id=wandb_run.id if wandb_run else None,
        rng=rng,
    )


# -----------------------------------------------------------------------------
# One writer per run: a run folder, and a lock file in it


def new_run_dir(out_dir, name):
    """A new run folder, created atomically: two runs started in the same second get two folders."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{name}")
    for i in range(1000):
        path = base if i == 0 else f"{base}-{i}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder in {out_dir}: clean up old runs")


def lock_run(run_dir):
    """Take the run folder for this process: run.lock holds pid and host, created with O_EXCL so
    that of two processes exactly one gets it (on Linux, macOS and Windows). A lock left on this host
    by a process that is gone, or that holds this process's own pid (a restarted container numbers
    its processes anew), is taken over with a warning, under a second lock (filelock) so that of two
    processes taking it over one does and the other then sees it held. A live holder is an error
    naming it; a holder on another host cannot be checked from here, and the error says how to take
    the run over once that host is checked. Returns the lock's path."""
    path = os.path.join(run_dir, "run.lock")
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # being written this instant: look again
                time.sleep(0.1)
                continue
            pid, host = holder
            if host != socket.gethostname():
                raise UserError(
                    f"run {run_dir} is locked by process {pid} on host {host}, which this host cannot check: "
                    f"if no process on {host} trains this run any more, delete {path} and rerun"
                )
            if pid != os.getpid() and pid_alive(pid):
                raise UserError(
                    f"run {run_dir} is in use by process {pid} on {host}: wait for it to end, stop it, "
                    f"or start a new run (drop --resume)"
                )
            take_over_stale_lock(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return path
    raise UserError(f"could not take the lock {path}: delete it if no process is training this run, then rerun")


def take_over_stale_lock(path, holder):
    """Remove run.lock if it still holds `holder` (a process that is gone). The check and the removal
    run under a filelock, so that two processes never both remove: the second one finds the first's
    new lock. The guard file is deleted afterwards (a guard taken meanwhile on the deleted file still
    finds the stale lock gone)."""
    import filelock

    guard = filelock.FileLock(path + ".takeover", timeout=30)
    with guard:
        if read_lock(path) == holder:  # still the stale one: nobody took it over meanwhile
            print(
                f"warning: {os.path.dirname(path)} was locked by process {holder[0]}, which is gone: "
                "taking the run over",
                file=sys.stderr,
            )
            os.remove(path)
    with contextlib.suppress(OSError):
        os.remove(path + ".takeover")


def read_lock(path):
    """(pid, host) of a lock file, or None while it is being written (or is damaged)."""
    try:
        pid, host = open(path).read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    """Is process `pid` of this host running? On Windows os.kill would end it: ask the kernel instead."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(path):
    """Remove run.lock if this process holds it (a lock another process took over is left alone)."""
    if path is None:
        return
    holder = read_lock(path)
    if holder is not None and holder[0] == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(path)
