"""
Devices and processes: the device and autocast a run trains with, and what the ranks of a torchrun
job share (rank 0's decisions, stop requests, losses, RNG states, a check that the replicas agree).
Without torchrun every helper is the one-process case. Also the stop signals (Ctrl-C, SIGTERM).
"""

import contextlib
import functools
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

from configurator import UserError, pick_device, report


def setup_device(C):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    kind = pick_device(C.device).type
    use_cuda = kind == "cuda"
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if kind == "mps":
            raise UserError(
                "torchrun with --device=mps: torch.distributed does not run on Apple's GPU; train in one process"
            )
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else kind)
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = pick_precision(C.dtype, kind)
    if C.dtype == "auto":  # the CPU's timed probe could differ between ranks: rank 0's answer for all
        precision = from_rank0(SimpleNamespace(ddp=ddp), precision)
    if C.dtype == "bf16" and kind == "cpu" and not cpu_bf16_pays() and rank == 0:  # asked for: allowed, but said
        print(
            f"warning: --dtype=bf16 on a CPU whose bf16 matmuls run at {cpu_bf16_speedup():.2f}x its fp32 ones "
            f"(emulated, or no faster): training is slower, up to many times; --dtype=auto (or fp32) "
            f"trains in fp32 here",
            file=sys.stderr,
        )
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if precision == "bf16" and kind == "cpu":  # the banner says why: the measurement that decided it
        precision_label = f"bf16 autocast (bf16 matmuls {cpu_bf16_speedup():.1f}x fp32 on this CPU)"
    else:
        precision_label = "bf16 autocast" if precision == "bf16" else "fp32"
    return SimpleNamespace(
        ddp=ddp,
        rank=rank,
        world=world,
        device=dev,
        autocast=autocast,
        precision=precision,
        precision_label=precision_label,
        master=rank == 0,
    )


# bf16 pays on a CPU only where its bf16 matrix instructions clearly outrun its fp32 FMAs: the norms, attention,
# casts and elementwise ops stay fp32 or get no faster, so the whole step gains much less than the matmuls
# (docs/performance.md: a 0.57x matmul ratio made training slower, ratios near 4 and 7 made it 1.3-1.65x faster)
BF16_MIN_MATMUL_SPEEDUP = 3.0


@functools.cache
def cpu_bf16_speedup(n=512):
    """How many times faster this CPU multiplies two n x n matrices in bf16 than in fp32: the best of a few timed
    tries each, a fraction of a second once per process. Measured rather than read from the CPU's flags, because
    the flags do not tell: avx512_bf16 alone ran bf16 at 0.57x fp32 on one Xeon and at 3.9x on an AMD EPYC."""
    a = torch.randn(n, n)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # oneDNN picks and builds its kernel on the first call
        tries = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(2):
                x @ x
            tries.append(time.perf_counter() - t0)
        seconds[dtype] = min(tries)  # the least disturbed try
    return seconds[torch.float32] / seconds[torch.bfloat16]


def cpu_bf16_pays():
    return cpu_bf16_speedup() >= BF16_MIN_MATMUL_SPEEDUP


def pick_precision(dtype, kind):
    """--dtype=auto|bf16|fp32 on a device kind -> "bf16" (matmuls and convolutions under bf16 autocast; the
    weights, the optimizer, the norms and, on the CPU, attention stay fp32) or "fp32". auto: bf16 on CUDA, and on
    CPUs whose bf16 matmuls outrun their fp32 ones (cpu_bf16_pays: AMX tiles, some avx512_bf16 cores); fp32 on
    other CPUs, where bf16 kernels are no faster or emulated, and on Apple's GPU (mps), whose bf16 support depends
    on the macOS and torch versions."""
    if dtype == "bf16" and kind == "mps":
        raise UserError("--dtype=bf16 on Apple's GPU (mps) is not supported here: use --dtype=fp32 or auto")
    if dtype != "auto":
        return dtype
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_bf16_pays()) else "fp32"


def from_rank0(sysinfo, value):
    """Rank 0's value on every rank (e.g. whether the Hub answered), so that all ranks decide alike."""
    if not sysinfo.ddp:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(sysinfo, flag):
    """True if `flag` (a bool tensor) is true on any rank."""
    if sysinfo.ddp:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def all_mean(sysinfo, x):
    """The mean of a scalar tensor over ranks, as a float (the loss of the global batch)."""
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
    flag = torch.tensor([1 if local_signal else 0], device=sysinfo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def gather_rng(sysinfo, state):
    """Every rank's RNG state (dropout draws from it), so a resumed DDP run continues each rank's."""
    if not sysinfo.ddp:
        return [state]
    states = [None] * sysinfo.world
    dist.all_gather_object(states, state.cpu())
    return states


def restore_rng(rng, sysinfo):
    """Each rank continues its own random streams: rank r takes entry r (a checkpoint written by
    fewer ranks gives the extra ranks entry 0)."""
    mine = lambda states: states[sysinfo.rank] if sysinfo.rank < len(states) else states[0]
    torch.set_rng_state(mine(rng["torch"]))
    if sysinfo.device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(mine(rng["cuda"]), sysinfo.device)


@contextlib.contextmanager
def fail_together(sysinfo, poll=0.2, linger=3.0):
    """Under torchrun, one rank's failure ends every rank within seconds, its message printed once.
    A rank waiting in a collective for a failed one would otherwise wait forever (NCCL) or die with a
    traceback about a closed connection (gloo), and no signal reaches it there: Python runs handlers
    only between bytecodes. So the first rank to fail prints its error (a UserError's one line, or the
    traceback of a bug) and then marks the run failed in the process group's store; every rank has a
    thread that polls that mark and ends its own process (exit code 2). Ranks that fail after the first
    exit quietly. Without torchrun it does nothing."""
    if not sysinfo.ddp:
        yield
        return
    import threading
    import traceback

    store = dist.distributed_c10d._get_default_store()
    # a restarted job (torchrun --max-restarts) keeps the store: its marks are per attempt
    key = f"text-diffusion/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    done = threading.Event()

    def watch():
        while not done.wait(poll):
            try:
                if store.check([key + "/failed"]):
                    store.add(key + "/seen", 1)
                    os._exit(2)  # blocked in a collective: nothing short of this ends the process
            except Exception:  # the store is gone (its host ended): nothing left to watch
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    except Exception as e:
        done.set()
        watcher.join()
        try:
            first = store.add(key + "/claimed", 1) == 1
        except Exception:  # the store is gone with the rank that hosted it: say what this rank knows
            first = True
        if first:  # printed before the mark: once the others see it, torchrun stops this process too
            report(e) if isinstance(e, UserError) else traceback.print_exc()
        with contextlib.suppress(Exception):
            store.add(key + "/failed", 1)
            # without torchrun's agent, this process may host the store: the others must see the mark first
            if first and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                deadline = time.time() + linger
                while store.add(key + "/seen", 0) < sysinfo.world - 1 and time.time() < deadline:
                    time.sleep(poll / 2)
        raise SystemExit(2 if isinstance(e, UserError) else 1) from None
    finally:
        done.set()
        watcher.join()


class ReplicasDiverged(RuntimeError):
    """The DDP ranks hold different weights: a bug, not the user's input (a traceback, not one line)."""


def check_replicas_identical(sysinfo, model):
    """Every rank compares a checksum of its weights (their sum and a position-weighted sum, so that
    swapped entries count too) with rank 0's; all ranks raise ReplicasDiverged if any differs."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    position_weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=flat.dtype).sin()
    mine = torch.stack([flat.sum(), (flat * position_weights).sum()])
    rank0s = mine.clone()
    dist.broadcast(rank0s, src=0)
    all_same = torch.tensor([int(torch.equal(mine, rank0s))], device=mine.device)
    dist.all_reduce(all_same, op=dist.ReduceOp.MIN)  # 0 if any rank differs
    if not bool(all_same):
        raise ReplicasDiverged("DDP replicas diverged: the ranks hold different weights")
    if sysinfo.master:
        print(f"all {sysinfo.world} ranks hold identical weights")


def install_stop_handlers():
    """Returns the flag the loop reads; `stop.restore()` puts the previous handlers back."""
    stop = SimpleNamespace(signal=0, training=False)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop.restore = lambda: [signal.signal(s, h) for s, h in previous.items()]

    def handler(signum, frame):
        if not stop.training:  # loading data or the encoder: nothing to save yet, nothing was written
            print(f"stopped by signal {signum} before training started; nothing was written", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.signal = signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop
