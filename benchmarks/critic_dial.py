"""What a weaker critic costs, as one figure (issue 28; docs/critic.md): each critique arm's Avg@k
at its final checkpoint (seed mean, min-max bar) against its critic's exact agreement with the rule
critique on held-out attempts (toyworld/toy_world/critics/build.json; the rule critic is 100 %), one marker
per critique_validation setting; the rule critic's arm and, when given, GRPO's as horizontal lines.
It reads run folders (compare.compare_runs groups their seeds into arms) and loads no model.

    python benchmarks/critic_dial.py runs/c28-*-s? [--grpo runs/grpo-s?] [--out docs/critic_dial.png]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compare  # noqa: E402
from plumbing import common  # noqa: E402
from toyworld import toy_build  # noqa: E402
from toyworld import toy_critic  # noqa: E402
from eval import load_run_config  # noqa: E402

MARKERS = {"full": "o", "format": "s", "off": "x"}


def points(run_dirs):
    """[(label, agreement or None for the rule critic, validation, mean, low, high)] per arm."""
    arms, _ = compare.compare_runs(run_dirs)
    root = toy_build.world_root(load_run_config(run_dirs[0]).model)  # one world for all the runs
    out = []
    for arm in arms:
        finals = [row["avg"] for _, row in arm["final_rows"]]
        critic_model = arm["critic"]["name"] if arm["critic"] else "rule"
        name = toy_critic.name_of(root, critic_model) if root and critic_model != "rule" else None
        agreement = None
        if name:
            with open(os.path.join(toy_critic.folder(root), "build.json")) as f:
                agreement = json.load(f)["critics"][name]["exact"]
        out.append((arm["label"], agreement, arm["critic"]["validation"] if arm["critic"] else "full",
                    sum(finals) / len(finals), min(finals), max(finals)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="critique runs (seeds of one arm are pooled)")
    parser.add_argument("--grpo", nargs="*", default=[], help="GRPO runs: their final Avg@k as a line")
    parser.add_argument("--out", default="docs/critic_dial.png")
    args = parser.parse_args(argv)
    plt = common.pyplot()
    if plt is None:
        raise common.UserError("the figure needs matplotlib: pip install matplotlib==3.11.2 (or -r requirements-extras.txt)")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, agreement, validation, mean, low, high in points(args.runs):
        if agreement is None:  # the rule critic: exact by construction
            ax.axhspan(100 * low, 100 * high, color="tab:green", alpha=0.15)
            ax.axhline(100 * mean, color="tab:green", label=f"rule critic ({mean:.1%})")
            continue
        ax.errorbar([100 * agreement], [100 * mean], yerr=[[100 * (mean - low)], [100 * (high - mean)]],
                    fmt=MARKERS[validation], color="tab:blue" if validation == "full" else "tab:red", capsize=3,
                    label=f"critique_validation={validation}")
    if args.grpo:
        finals = [row["avg"] for arm in compare.compare_runs(args.grpo)[0] for _, row in arm["final_rows"]]
        ax.axhline(100 * sum(finals) / len(finals), color="gray", linestyle="--", label="GRPO (G = 8)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_xlim(0, 102)
    ax.set_xlabel("critic's exact agreement with the rule critique, held out (%)")
    ax.set_ylabel("Avg@12, final checkpoint (%)")
    ax.set_title("What a weaker critic costs (toy world, seed mean, min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with common.user_errors():
        main()
