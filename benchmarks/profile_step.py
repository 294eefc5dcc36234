"""
How much of the training loop's time is not the model? Runs a short `shapes` training run of
train_diffusion.py under `python -m cProfile` (a subprocess) and splits the loop's time (in train())
into the U-Net's forward, the backward pass, the optimizer, and everything else (batch assembly, caption dropout,
EMA update, logging, the loop's own Python). Goal: everything else < 5% of the loop.

    python -m benchmarks.profile_step                                             # 60 steps of the CPU recipe's model
    python -m benchmarks.profile_step --max_steps=100 --extra="--base_channels=32 --num_res_blocks=1 --batch_size=32"
    python -m benchmarks.profile_step --extra="config/shapes_16px.py"                 # another recipe file
    python -m benchmarks.profile_step --load_stats=step.prof   # re-read a profile saved with --save_stats

The run: --dataset=shapes --text_encoder=minilm --wandb_mode=disabled, eval/sample/checkpoint
intervals past max_steps (so evaluation runs only at step 0 and at the end, samples and the
checkpoint only at the end), written to a temporary out_dir that is deleted afterwards (unless
--extra names an --out_dir); --extra is passed on to train_diffusion.py after these (a config file
in it goes first, where train_diffusion.py wants it).

The arithmetic, all from cProfile's cumulative times of calls made directly by train(), the function that
holds the loop:
- loop time = train's total minus its calls to the checkpoint, evaluation, sample and end-of-run work
  listed in SETUP_AND_END below (the data set, text encoder and model are built by setup(), before
  train()). train's own Python lines count as loop time.
- forward = diffusion_loss (q_sample + U-Net forward + MSE) as called by train (validation calls it
  too, from validation_loss, and those are not counted); backward = torch.Tensor.backward;
  optimizer = optimizer.step + zero_grad + clip_grad_norm_ (clipping counts as optimizer).
- outside = loop - forward - backward - optimizer; the biggest contributors are listed.
cProfile charges every Python call a little overhead, most of it to Python-heavy code, which is
what "outside" mostly is: the share it reports is an upper bound. On CUDA this script sets
CUDA_LAUNCH_BLOCKING=1 (unless set) so that GPU time is charged to the call that launched it and
not to the next synchronisation; that removes the overlap of CPU and GPU work, so the run is slower.

Keys (--key=value): max_steps, extra (train_diffusion.py arguments, quoted), save_stats (write the
raw profile there), load_stats (analyse a saved profile instead of running), top (rows of 'outside').
"""

import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # before torch initialises CUDA

from configurator import UserError, parse_config, run_cli

DEFAULTS = dict(max_steps=60, extra="", save_stats="", load_stats="", top=8)

# train()'s direct calls that are setup or end-of-run work, as (file, function) of the profile.
SETUP_AND_END = {
    ("evaluation.py", "__call__"): "evaluation (validation loss, shapes adherence)",  # the Evaluator
    ("checkpoints.py", "checkpoint_state"): "checkpoint (state dicts)",
    ("checkpoints.py", "save_checkpoint"): "checkpoint (written atomically)",
    ("evaluation.py", "write_log"): "evaluation",
    ("module.py", "parameters"): "model construction",
    ("module.py", "train"): "model construction",
    ("evaluation.py", "save_samples"): "samples",
    ("train_diffusion.py", "finish"): "end of run (W&B, the last line)",
    ("asyncio.py", "__init__"): "progress bar (tqdm)",
    ("std.py", "write"): "progress bar (tqdm.write of the evaluation lines)",
    ("std.py", "close"): "progress bar (tqdm)",
}
# train()'s direct calls that are the model's work in the loop.
MODEL = {
    ("diffusion_model.py", "diffusion_loss"): "forward",
    ("_tensor.py", "backward"): "backward",
    ("optimizer.py", None): "optimizer",  # step and zero_grad, whatever wrapper names they carry
    ("clip_grad.py", None): "optimizer",  # clip_grad_norm_ (through its no-grad wrapper)
    ("_compile.py", "inner"): "optimizer",  # zero_grad, through torch._disable_dynamo's wrapper
}


def find(table, func):
    """The label of a profile entry (file, line, name) in SETUP_AND_END or MODEL, else None."""
    filename, _, name = func
    base = os.path.basename(filename)
    return table.get((base, name)) or table.get((base, None))


def label(func):
    filename, line, name = func
    return name if filename == "~" else f"{os.path.basename(filename)}:{line}({name})"


def analyse(stats, top):
    main_keys = [f for f in stats.stats if os.path.basename(f[0]) == "train_diffusion.py" and f[2] == "train"]
    if len(main_keys) != 1:
        raise UserError(f"the profile has {len(main_keys)} entries for train_diffusion.train (expected 1)")
    main_key = main_keys[0]
    main_total = stats.stats[main_key][3]
    main_own = stats.stats[main_key][2]
    # cumulative time of each function, counting only the calls train() makes itself
    direct = {func: entry[4][main_key][3] for func, entry in stats.stats.items() if main_key in entry[4]}

    setup = {}
    model = dict(forward=0.0, backward=0.0, optimizer=0.0)
    other = {}
    for func, seconds in direct.items():
        if find(SETUP_AND_END, func):
            setup[f"{label(func)} x{stats.stats[func][4][main_key][1]}: {find(SETUP_AND_END, func)}"] = seconds
        elif find(MODEL, func):
            model[find(MODEL, func)] += seconds
        else:
            other[label(func)] = seconds
    for what, seconds in model.items():
        if seconds == 0.0:
            raise UserError(
                f"no {what} time found among train()'s calls: train_diffusion.py or torch changed, update MODEL"
            )

    loop = main_total - sum(setup.values())
    outside = loop - sum(model.values())
    print(f"train(): {main_total:.2f}s in all; subtracted as setup and end-of-run work ({sum(setup.values()):.2f}s):")
    for name, seconds in sorted(setup.items(), key=lambda kv: -kv[1]):
        print(f"    {seconds:8.3f}s  {name}")
    print(f"\nloop time {loop:.2f}s")
    print("| component | seconds | share of loop time |")
    print("|---|---|---|")
    for what, seconds in model.items():
        print(f"| {what} | {seconds:.3f} | {seconds / loop:.1%} |")
    print(f"| outside forward/backward/optimizer | {outside:.3f} | {outside / loop:.1%} |")
    print(f"\nbiggest parts of 'outside' (train's own lines: {main_own:.3f}s = {main_own / loop:.1%}):")
    for name, seconds in sorted(other.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {seconds:8.3f}s  {seconds / loop:6.1%}  {name}")
    verdict = "meets" if outside / loop < 0.05 else "MISSES"
    print(f"\noutside forward/backward/optimizer: {outside / loop:.1%} of the loop ({verdict} the goal < 5%)")
    return dict(loop=loop, outside=outside, **model)


def main(argv):
    C, _ = parse_config(argv, DEFAULTS)
    if C.load_stats:
        return analyse(pstats.Stats(C.load_stats), C.top)
    if C.max_steps < 1:
        raise UserError("--max_steps must be >= 1")
    extra = shlex.split(C.extra)
    if any(a.startswith("--max_steps=") for a in extra):
        raise UserError(
            "pass --max_steps to this script, not in --extra (it also sets the eval/sample/checkpoint intervals)"
        )
    keep_out_dir = any(a.startswith("--out_dir=") for a in extra)
    out_dir = None if keep_out_dir else tempfile.mkdtemp(prefix="profile_step_")
    n = C.max_steps
    # train_diffusion.py takes config files before any --key=value: a recipe file in --extra goes first
    files = [a for a in extra if not a.startswith("--")]
    args = files + [
        "--dataset=shapes",
        "--text_encoder=minilm",
        "--wandb_mode=disabled",
        f"--max_steps={n}",
        f"--eval_interval={n + 1}",
        f"--sample_interval={n + 1}",
        f"--ckpt_interval={n + 1}",
    ]
    args += [] if keep_out_dir else [f"--out_dir={out_dir}"]
    args += [a for a in extra if a.startswith("--")]
    print("train_diffusion.py " + shlex.join(args))
    # the script runs as it would from the shell, under `python -m cProfile`: scripts are not imported
    stats_path = C.save_stats or os.path.join(tempfile.mkdtemp(prefix="profile_stats_"), "step.prof")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "cProfile", "-o", stats_path, "train_diffusion.py", *args], cwd=root)
    finally:
        if out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    if r.returncode != 0:
        raise UserError(f"the profiled run failed (exit code {r.returncode}): see its output above")
    print(f"profiled run: {time.time() - t0:.1f}s wall")
    if C.save_stats:
        print(f"wrote {C.save_stats} (python -m pstats {C.save_stats}, or --load_stats= to re-read it)")
    return analyse(pstats.Stats(stats_path), C.top)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
