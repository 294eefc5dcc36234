"""
Quality against U-Net evaluations per image, one line per sampler, from the tables that
benchmarks/bench_sampling.py writes (--table): KID x 1000 on an image-folder checkpoint (lower is
better, with its spread), shape adherence of the never-seen pairs on a shapes checkpoint (higher is better).

    python docs/make_sampler_plot.py --kid=pokemon.tsv --adherence=shapes.tsv --out docs/samplers.png
"""

import argparse
import csv
import re


def read_table(path):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        for k, v in r.items():
            if k != "sampler":
                r[k] = float(v)
    return rows


def family(label):
    """ "ddim25 eta=0" -> "ddim eta=0": the sampler without its number of steps."""
    return re.sub(r"\d+", "", label, count=1)


COLORS = {"ddpm": "tab:green", "ddim": "tab:blue", "dpmpp": "tab:orange"}  # one color per sampler in both panels


def plot(ax, rows, key, err=None):
    families = {}
    for r in rows:
        families.setdefault(family(r["sampler"]), []).append(r)
    for name, rs in families.items():
        rs.sort(key=lambda r: r["evals"])
        x, y = [r["evals"] for r in rs], [r[key] for r in rs]
        color = COLORS.get(name.split(" ")[0])
        if err:
            ax.errorbar(x, y, yerr=[r[err] for r in rs], marker="o", label=name, capsize=3, color=color)
        else:
            ax.plot(x, y, marker="o", label=name, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("U-Net evaluations per image (a guided step counts 2)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--kid", default="", help="bench_sampling table of an image-folder checkpoint")
    p.add_argument("--adherence", default="", help="bench_sampling table of a shapes checkpoint")
    p.add_argument("--out", default="samplers.png")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(path, kind) for path, kind in ((args.kid, "kid"), (args.adherence, "adherence")) if path]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (path, kind) in zip(axes[0], panels):
        rows = read_table(path)
        if kind == "kid":
            plot(ax, rows, "kid", "kid_std")
            ax.set_ylabel("KID x 1000 against held-out art (lower is better)")
            ax.set_title("Pokémon recipe")
        else:
            plot(ax, rows, "held_out_shape")  # the attribute the samplers differ on (the table has the others)
            ax.set_ylim(0.9, 1.005)
            ax.set_ylabel("never-seen pairs: shape adherence")
            ax.set_title("shapes recipe")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
