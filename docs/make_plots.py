"""
Plot logged metrics against training steps from runs' log.jsonl files: one subplot per metric,
the runs overlaid and labelled by their folder names.

    python docs/make_plots.py diffusion_results/<run> diffusion_results/<other run>
    python docs/make_plots.py diffusion_results/*/ --prefixes adherence/w3/held_out/ val/loss --out held_out.png
    python docs/make_plots.py <run> --prefixes quality/ train/loss

train_diffusion.py appends one JSON line per log or evaluation event to <run>/log.jsonl: "step" and
numbers keyed like the W&B dashboard (train/loss, train/lr, val/loss,
adherence/w{0,3}/{seen,held_out}/{color,shape,size,position}, with scenes
scenes/w{0,3}/{seen,held_out}/{count,binding,position}, eval/seconds, and quality/... for the
image metrics of image datasets). Every numeric key that starts with one of --prefixes is plotted.
"""

import argparse
import json
import math
import os
import sys

DEFAULT_PREFIXES = ["val/loss", "adherence/w3/", "scenes/w3/", "quality/"]


def read_log(path):
    """{key: [(step, value), ...]} of the numeric entries of one log.jsonl."""
    series = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path} line {n} is not JSON, skipped", file=sys.stderr)
                continue
            step = row.get("step")
            if not isinstance(step, (int, float)):
                continue
            for key, value in row.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    series.setdefault(key, []).append((step, value))
    return series


def log_path(arg):
    """A run folder or a log.jsonl file -> (label, path to its log.jsonl)."""
    path = os.path.join(arg, "log.jsonl") if os.path.isdir(arg) else arg
    label = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return label, path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (or their log.jsonl files)")
    p.add_argument(
        "--prefixes",
        nargs="+",
        default=DEFAULT_PREFIXES,
        help=f"plot the numeric keys that start with any of these (default: {' '.join(DEFAULT_PREFIXES)})",
    )
    p.add_argument("--out", default="training_curves.png", help="the PNG to write")
    p.add_argument("--cols", type=int, default=4, help="subplots per row")
    args = p.parse_args(argv)

    runs = []
    for arg in args.runs:
        label, path = log_path(arg)
        if not os.path.isfile(path):
            sys.exit(f"error: no log.jsonl at {path}")
        runs.append((label, read_log(path)))
    keys = sorted({k for _, series in runs for k in series if any(k.startswith(pre) for pre in args.prefixes)})
    if not keys:
        found = sorted({k for _, series in runs for k in series})
        sys.exit(
            f"error: no numeric key starts with {' or '.join(args.prefixes)}; the logs hold: "
            f"{', '.join(found) or 'nothing'}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(args.cols, len(keys)))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, series in runs:
            points = sorted(series.get(key, []))
            if points:
                steps, values = zip(*points)
                # evaluations are sparse (every eval_interval steps): markers show where they are
                ax.plot(steps, values, marker="o" if len(points) < 50 else None, markersize=3, label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key.startswith(("adherence/", "scenes/")):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # the first subplot may lack a run that logged no value for its key
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if rows == 1 else 0.03, 1, 1))
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: {len(keys)} metrics from {len(runs)} runs")


if __name__ == "__main__":
    main()
