"""The training-curve figure of `compare.py --plot`, drawn from the rows compare.plot_rows gathers
(one dict per arm, metric and step: the seed mean, std, min and max). Only matplotlib here: which
runs form an arm, and what their files hold, is compare.py's job."""
import math
import statistics
import textwrap

from plumbing import common

EVAL_CURVES = (("avg", "Avg"), ("pass", "Pass"), ("maj", "Maj"))  # eval.jsonl, in %, the paper's three
SMALL_PANELS = (("length", "eval response length (tokens)"), ("train/reward", "train reward (share right)"),
                ("train/kl", "KL per distilled token (SD arms)"),
                ("train/response_len", "train response length (tokens)"),
                ("train/critique_invalid", "invalid critiques per step (critique arms)"),
                ("train/entropy", "student entropy per distilled token"))
TRAIN_CURVES = tuple(panel for panel in SMALL_PANELS if panel[0].startswith("train/"))  # metrics.jsonl


def best_point(points):
    """The checkpoint with the highest seed mean (the earliest of equals); never step 0, the base."""
    trained = [p for p in points if p["step"] > 0]
    return max(trained, key=lambda p: (p["mean"], -p["step"])) if trained else None


MARKERS = "osD^vP<>Xh"  # one shape per arm on the evaluation panels (the star is the best checkpoint)


def identical_arms(rows, arms):
    """{arm: '; Avg@k as ARM'} for an arm whose seed-mean Avg@k curve equals an earlier arm's point
    for point: drawn on top of it, it would hide it, so the legend says so."""
    curve = {arm: [(r["step"], r["mean"]) for r in rows if r["arm"] == arm and r["metric"] == "avg"] for arm in arms}
    return {arm: f"; Avg curve = {other}'s" for i, arm in enumerate(arms)
            for other in arms[:i][::-1] if curve[arm] == curve[other]}


def draw_curves(ax, rows, arms, colours, metric, x, scale, eval_panel, same_as):
    """One panel: each arm's seed mean (line), its min–max band over seeds, and on the evaluation
    panels its best checkpoint (a star). On a log rollouts axis step 0 (0 rollouts) has no place:
    the base is the dashed line. same_as: identical_arms."""
    for i, arm in enumerate(arms):
        points = [r for r in rows if r["arm"] == arm and r["metric"] == metric and (x == "step" or r["rollouts"] > 0)]
        if not points:
            continue  # e.g. GRPO logs no KL
        xs, seeds = [p[x] for p in points], max(p["seeds"] for p in points)
        # a marker shape per arm: arms whose curves coincide stay apart, and colour is not the only cue
        hollow = i % 2  # hollow and larger on every other arm, so a filled one under it still shows
        ax.plot(xs, [scale * p["mean"] for p in points], color=colours[arm], linewidth=1.5 if eval_panel else 1,
                marker=MARKERS[i % len(MARKERS)] if eval_panel else None, markersize=6 if hollow else 4,
                markerfacecolor="none" if hollow else colours[arm],
                label=f"{arm} ({seeds} seed{'s' if seeds != 1 else ''}{same_as.get(arm, '')})")
        if seeds > 1:
            ax.fill_between(xs, [scale * p["min"] for p in points], [scale * p["max"] for p in points],
                            color=colours[arm], alpha=0.2, linewidth=0)
        best = best_point(points) if eval_panel and metric != "length" else None
        if best:
            ax.plot([best[x]], [scale * best["mean"]], marker="*", markersize=13, color=colours[arm],
                    markeredgecolor="black", markeredgewidth=0.6, linestyle="none", zorder=5)
    if not ax.lines:
        ax.text(0.5, 0.5, "not logged by these arms", ha="center", va="center", transform=ax.transAxes,
                fontsize=9, color="0.4")


def label_ceilings(ax, ceilings, colours):
    """Each toy-world teacher ceiling as a dotted line in its arm's colour, named at its right end;
    names of close ceilings are pushed apart so that each stays legible."""
    low, high = ax.get_ylim()
    gap, placed = 0.045 * (high - low), []
    for r in sorted(ceilings, key=lambda r: r["mean"]):
        y = 100 * r["mean"]
        ax.axhline(y, color=colours[r["arm"]], linestyle=":", linewidth=1.3)
        text_y = max(y, placed[-1] + gap) if placed else y
        placed.append(text_y)
        ax.annotate(f"{r['arm']} teacher {y:.1f}", xy=(1, text_y), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=7,
                    color=colours[r["arm"]], bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))


def draw_training(rows, setting, out, x="step"):
    """Draw compare.plot_rows' rows into OUT: Avg@k, Pass@k and Maj@k over training per arm (line:
    mean over seeds; band: min–max over seeds; star: the best checkpoint; dashed: the base; dotted: a
    toy world's teacher ceilings, named at their line), then the evaluation's length and the training
    log's reward, KL, length, invalid critiques and entropy. x="rollouts" draws a log axis. Returns
    OUT, or None without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    same_as = identical_arms(rows, arms)
    fig = plt.figure(figsize=(13, 10))
    grid = fig.add_gridspec(3, 3, height_ratios=(1.5, 1, 1))
    k = setting["k"]
    panels = [(fig.add_subplot(grid[0, i]), metric, f"{name}@{k} (%)", 100)
              for i, (metric, name) in enumerate(EVAL_CURVES)]
    panels += [(fig.add_subplot(grid[1 + i // 3, i % 3]), key, title, 1) for i, (key, title) in enumerate(SMALL_PANELS)]
    for ax, metric, title, scale in panels:
        draw_curves(ax, rows, arms, colours, metric, x, scale, metric in ("avg", "pass", "maj", "length"), same_as)
        base = [r["mean"] for r in rows if r["metric"] == metric and r["step"] == 0]
        if base and metric != "length":
            ax.axhline(100 * statistics.fmean(base), color="0.4", linestyle="--", linewidth=1,
                       label=f"base, step 0 ({100 * statistics.fmean(base):.1f})" if metric == "avg" else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if x == "rollouts":
            ax.set_xscale("log")  # the arms' rollouts differ by G × questions per step: 8-30x
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.set_xlabel("training step" if x == "step" else "rollouts (log)", fontsize=8)
        ax.tick_params(labelsize=8)
    top = panels[0][0]
    ceilings = [r for r in rows if r["metric"] == "ceiling"]
    if ceilings:  # room above the highest ceiling, which would otherwise sit on the frame
        top.set_ylim(top=max(top.get_ylim()[1], 100 * max(r["mean"] for r in ceilings) + 6))
        label_ceilings(top, ceilings, colours)
    handles, labels = top.get_legend_handles_labels()  # under the figure: never over a curve
    ncol = 3 if max(map(len, labels)) <= 40 else 2  # long arm labels (settings) get two columns
    rates = {r["arm"]: r["rollouts"] // r["step"] for r in rows if r["step"]}
    per_step = (" Rollouts per step (questions × G): " + ", ".join(f"{a} {n}" for a, n in rates.items()) + "."
                if x == "step" and len(set(rates.values())) > 1 else "")
    title = (f"line: mean over seeds; band: min–max over seeds; ★: best checkpoint (seed mean); evaluated on "
             f"{setting['questions']} test questions × {setting['n']} samples, T = {setting['temperature']}"
             + ("; dotted: the arm's teacher with its own context (build.json), its ceiling" if ceilings else "")
             + "." + per_step)
    fig.legend(handles, labels, title="\n".join(textwrap.wrap(title, 150)), fontsize=8, title_fontsize=8,
               loc="lower center", ncol=ncol)
    if len(arms) == 1:  # one arm: the figure still says what it shows
        fig.suptitle(f"{arms[0]} on {setting['model']}", fontsize=11)
    legend_lines = math.ceil(len(labels) / ncol) + 1 + len(textwrap.wrap(title, 150))
    fig.tight_layout(rect=(0, 0.02 * legend_lines, 1, 1))  # room for the legend
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
