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
    checkpoint: a crash or a full disk at any moment leaves the previous checkpoint intact, and a
    write that fails for any reason is one line saying so."""
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
        if not isinstance(e, Exception):
            raise
        # full disk, quota, permissions: the user's to fix, and nothing is lost. Any error, not only OSError: on a
        # real full disk torch.save's zip writer raises RuntimeError ("unexpected pos"), the kernel's error behind it
        os_error = e
        while os_error is not None and not isinstance(os_error, OSError):
            os_error = os_error.__cause__ or os_error.__context__
        why = os_error.strerror if os_error is not None and os_error.strerror else " ".join(str(e).split())[:200]
        raise UserError(
            f"could not write checkpoint {path} ({why or type(e).__name__}): the previous checkpoint is kept; "
            f"free space and resume with --resume=auto"
        ) from None


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


def load_checkpoint(path, check_weights=True):
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
    check_checkpoint(ckpt, path, check_weights)
    return ckpt


# what sampling and resuming read; the other fields are checked where present (resuming insists on them)
NEEDED = ("model", "model_args", "step", "num_timesteps", "prediction_type", "text_encoder", "dataset")
# what a checkpoint's U-Net may hold: UNetConfig's fields, with bounds that keep an edited file from asking for
# terabytes (training's RANGES are narrower; a checkpoint from another recipe is still welcome)
MODEL_ARGS = dict(
    image_size="[1, 4096]",
    in_channels="[3, 3]",  # sampling writes RGB
    base_channels="[32, 4096]",
    channel_mults="1+ of [1, 64]",
    num_res_blocks="[1, 64]",
    attention_levels="0+ of [0, 63]",
    n_heads="[1, 256]",
    context_dim="[1, 65536]",
    dropout="[0, 1)",
    pos_embed="bool",
    coord_conv="bool",
    patch_size="[1, 64]",
    text_layers="[0, 64]",
)
# U-Net settings added after checkpoints were written without them: absent means the U-Net before them
ADDED_MODEL_ARGS = dict(text_layers=0)


def check_checkpoint(ckpt, path, check_weights=True):
    """Every field of a checkpoint, before torch or the scripts use it: a damaged or edited file is
    one line naming the field, never a traceback deep in torch, and never images drawn from NaN weights.
    load_checkpoint calls it, so sampling, resuming and the benchmarks all get these checks.
    check_weights=False checks the fields only: resuming first compares model_args with the run's
    settings, whose message says more, then checks the weights."""
    from configurator import describe, is_valid

    def bad(field, value, expected):
        shown = repr(value) if len(repr(value)) <= 60 else type(value).__name__
        raise UserError(
            f"{path}: {field} is {shown}: expected {expected}; the checkpoint is damaged, edited or from another "
            f"program: use another ckpt.pt written by train_diffusion.py"
        )

    if not isinstance(ckpt, dict) or any(k not in ckpt for k in NEEDED):
        raise UserError(
            f"{path} is not a checkpoint of this repo (it lacks {', '.join(NEEDED)}): "
            f"pass a ckpt.pt written by train_diffusion.py"
        )
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not is_int(ckpt["step"]) or ckpt["step"] < 0:
        bad("step", ckpt["step"], "an integer >= 0")
    if not is_int(ckpt["num_timesteps"]) or not 2 <= ckpt["num_timesteps"] <= 100_000:
        bad("num_timesteps", ckpt["num_timesteps"], "an integer in [2, 100000]")
    if ckpt["prediction_type"] not in ("v", "eps"):
        bad("prediction_type", ckpt["prediction_type"], "one of v, eps")
    for key in ("text_encoder", "dataset"):
        if not isinstance(ckpt[key], str) or not ckpt[key].strip():
            bad(key, ckpt[key], "a non-empty name")
    if ckpt.get("wandb_id") is not None and not isinstance(ckpt["wandb_id"], str):
        bad("wandb_id", ckpt["wandb_id"], "text or None")
    for key in ("config", "rng"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            bad(key, ckpt[key], "a dict")

    args = ckpt["model_args"]
    if not isinstance(args, dict):
        bad("model_args", args, "a dict of the U-Net's settings")
    for key, before in ADDED_MODEL_ARGS.items():
        args.setdefault(key, before)
    unknown = [k for k in args if k not in MODEL_ARGS]
    if unknown:
        raise UserError(
            f"{path}: model_args has the unknown key {unknown[0]!r}: the checkpoint is from another version"
        )
    lacking = [k for k in MODEL_ARGS if k not in args]
    if lacking:
        raise UserError(f"{path}: model_args lacks {', '.join(lacking)}: the checkpoint is from another version")
    for key, spec in MODEL_ARGS.items():
        value = tuple(args[key]) if isinstance(args[key], list) else args[key]
        if key == "dropout" and is_int(value):
            value = float(value)
        must_be_int = " of " not in spec and spec != "bool" and key != "dropout"
        if (must_be_int and not is_int(value)) or not is_valid(value, spec):
            bad(f"model_args {key}", args[key], describe(spec))
    try:
        cfg = UNetConfig(**args)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"checkpoint model_args are invalid ({e}): the checkpoint is damaged or from another version"
        ) from None

    if "rng" in ckpt:
        rng = ckpt["rng"]
        states = rng.get("torch"), rng.get("cuda")
        if (
            not all(
                isinstance(s, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in s)
                for s in states
            )
            or not states[0]
        ):
            raise UserError(
                f"{path}: rng is not a list of RNG states (uint8 tensors) per rank: the checkpoint is damaged"
            )
    if "config" in ckpt and not all(isinstance(k, str) for k in ckpt["config"]):
        bad("config", ckpt["config"], "a dict of settings")
    if not check_weights:
        return
    # the weights: a dict of finite tensors of exactly the shapes of the U-Net its model_args describe
    # (built on the meta device: shapes without memory)
    with torch.device("meta"):
        unet = UNet(cfg)
    reference = unet.state_dict()
    for part in ("model", "ema"):
        if part not in ckpt:
            continue
        weights = ckpt[part]
        if not isinstance(weights, dict):
            raise UserError(
                f"{path}: {part} is not a dict of tensors but a {type(weights).__name__}: the checkpoint is damaged"
            )
        for name, ref in reference.items():
            if name not in weights:
                raise UserError(f"{path}: {part} lacks {name}: the checkpoint is damaged or from another version")
        for name, w in weights.items():
            if name not in reference:
                raise UserError(
                    f"{path}: {part} holds {name}, which its model_args have no place for: the checkpoint is edited "
                    f"or from another version"
                )
            if not isinstance(w, torch.Tensor) or w.layout != torch.strided or w.device.type != "cpu":
                raise UserError(f"{path}: {part}[{name!r}] is not a tensor of numbers: the checkpoint is damaged")
            ref = reference[name]
            if w.is_floating_point() != ref.is_floating_point() or w.is_complex():
                raise UserError(f"{path}: {part}[{name!r}] is {w.dtype}, not {ref.dtype}: the checkpoint is damaged")
            if w.shape != ref.shape:
                raise UserError(
                    f"checkpoint weights do not fit its model_args (size mismatch for {name}: {tuple(w.shape)} in "
                    f"{part}, {tuple(ref.shape)} for its model_args): the checkpoint is damaged or edited"
                )
        if not all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
            # training never saves such weights: sampling them would write black images and exit 0
            raise UserError(f"{path}: {part} holds NaN or inf weights: the checkpoint is damaged; use another one")

    if "optimizer" in ckpt:
        check_optimizer_state(ckpt["optimizer"], [p.shape for p in unet.parameters()], path, bad)


def check_optimizer_state(opt, shapes, path, bad):
    """AdamW's state_dict: what torch's load_state_dict would take, and per-parameter moments of the right shape
    (torch only finds a wrong shape at the first step, as a traceback)."""
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
    ):
        bad("optimizer", opt, "a dict with state and param_groups")
    ids = [i for g in opt["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    if len(ids) != len(shapes) or not all(isinstance(g, dict) for g in opt["param_groups"]):
        raise UserError(
            f"{path}: optimizer holds {len(ids)} parameters, its U-Net has {len(shapes)}: the checkpoint is damaged"
        )
    where = {i: n for n, i in enumerate(ids)}
    for i, state in opt["state"].items():
        if i not in where or not isinstance(state, dict):
            raise UserError(f"{path}: optimizer state {i!r} belongs to no parameter: the checkpoint is damaged")
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise UserError(
                    f"{path}: optimizer state of parameter {i} holds a {type(t).__name__}: the checkpoint is damaged"
                )
            if t.dim() > 0 and t.shape != shapes[where[i]]:
                raise UserError(
                    f"{path}: optimizer state of parameter {i} has shape {tuple(t.shape)} in {key}, its weight "
                    f"{tuple(shapes[where[i]])}: the checkpoint is damaged"
                )


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


def checkpoint_state(C, state, data, step, sysinfo, wandb_run):
    """What ckpt.pt holds. Collective under torchrun: every rank must call it."""
    rng = dict(
        torch=gather_rng(sysinfo, torch.get_rng_state()),
        cuda=gather_rng(sysinfo, torch.cuda.get_rng_state(sysinfo.device)) if sysinfo.device.type == "cuda" else [],
    )
    return dict(
        model=state.model.state_dict(),
        ema=state.ema.state_dict(),
        optimizer=state.optimizer.state_dict(),
        step=step,
        model_args=dataclasses.asdict(state.model_config),
        num_timesteps=C.num_timesteps,
        prediction_type=C.prediction_type,
        text_encoder=C.text_encoder,
        dataset=data.name,
        config=vars(C),
        wandb_id=wandb_run.id if wandb_run else None,
        rng=rng,
    )


# -----------------------------------------------------------------------------
# One writer per run: a run folder, and a lock file in it


def check_output_dir(path, key="--out_dir"):
    """Fail in one line, before any work, when `path` cannot hold output: it is a file (or a link to
    nowhere), lies under one, or the folder it would be made in cannot be written (a read-only disk,
    permissions). Creates nothing: a run stopped by another error leaves no empty folder behind."""
    import tempfile

    try:
        folder = os.path.abspath(path)
        while os.path.dirname(folder) != folder:  # up to the part that exists already (a name too long: an error)
            try:
                os.lstat(folder)
                break
            except (FileNotFoundError, NotADirectoryError):
                folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise UserError(f"{key}={path}: {folder} is a file, not a folder: pass another {key}")
        # by writing: os.access answers yes to root on a read-only mount's files and knows nothing of quotas
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{key}={path}: cannot write in {folder} ({why}): pass a writable {key}") from None


def new_run_dir(out_dir, name):
    """A new run folder, created atomically: two runs started in the same second get two folders."""
    base = os.path.join(out_dir, datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{name}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        for i in range(1000):
            path = base if i == 0 else f"{base}-{i}"
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as e:  # a name too long, a disk that filled since check_output_dir
        raise UserError(
            f"cannot create a run folder in {out_dir} ({e.strerror or e}): pass another --out_dir"
        ) from None
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
        except OSError as e:  # a read-only disk, permissions: the run cannot be written, so it is not resumed
            raise UserError(
                f"cannot write in run {run_dir} ({e.strerror or e}): copy the run somewhere writable"
            ) from None
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
