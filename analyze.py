"""The per-token advantage analysis of Fig. 4 (the paper's §2): for wrong rollouts, how the teacher
with each context scores every response token against the student,

    A_t = log π_T(ŷ_t | x, c, ŷ<t) − log π_θ(ŷ_t | x, ŷ<t),

written as a self-contained HTML page (tokens coloured by A_t, step boundaries and the first error
marked), a JSON of the numbers and, with matplotlib, Fig. 4-style PNGs.

Choices the paper leaves open (ours):
 1. The analysis teacher is always the base model (LoRA off), the paper's; logits are divided by
    `logit_temperature`, as in the loss. Rollouts are sampled from the analysed model (step 0 =
    the base, the default), one per test question, and kept when the critic marks them wrong at
    a step we can locate (see first_wrong_step). The two controls are built from the critique
    (see analysis_contexts). Step 0's student is the base itself (a zero adapter).
 2. Spreads: the pooled Fig. 4 draws the mean over rollouts ± 2 standard errors. The error focus
    needs a correct step before the wrong one and divides by at least FOCUS_FLOOR (see
    advantage_summary).

Outputs: advantage_step_S.{html,json} (with matplotlib also .png, one rollout, and _aligned.png,
all pooled) in RUN/analysis/, or for a model in ./analysis/NAME/.

Commands:
    python analyze.py runs/critique-s0 [--step 40] [--rollouts 8] [--out DIR]
    python analyze.py toy                        # the toy base model, no run needed
    python analyze.py path/to/model test_file=test.jsonl critic=http critic_url=... critic_model=...
"""
import argparse
import html
import json
import math
import os
import statistics

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch
from safetensors import SafetensorError

import chunked_head
from plumbing import common
from plumbing import options
import contexts
import critic
from plumbing import runfolder
from plumbing import sampler
from toyworld import world
from plumbing.common import UserError
from eval import check_adapter_base, checkpoint_steps, load_adapter, target_config

# ---------------------------------------------------------------------------------------------
# Per-token advantage A_t: one student forward, one teacher forward per context (batched rows).

KINDS = ("reference", "critique", "critique_quoting", "critique_no_prefix")


def response_logp(model, cfg, prompts, responses, pad_id, device):
    """log π(ŷ_t | prompt, ŷ<t) for each response: a list of (T_i,) tensors. The caller decides
    which model this is (adapter on or off). The LM head runs on `chunk_size` positions at a time,
    so no (B, T, V) tensor is ever held (the memory rule, chunked_head.py)."""
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d)
    out = []
    for i in range(0, len(prompts), cfg.micro_batch):
        part = responses[i:i + cfg.micro_batch]
        rows = contexts.build_rows(prompts[i:i + cfg.micro_batch], part, pad_id)
        mask = rows["response_mask"].to(device)  # (B, T), responses right-aligned
        hidden = chunked_head.response_hidden(model, rows, mask.shape[1], device)[mask]  # (N, d)
        ids = rows["input_ids"][:, -mask.shape[1]:].to(device)[mask]  # (N,) the tokens ŷ_t
        chunk = chunked_head.chunk_positions(cfg.chunk_size, weight.shape[0])  # chunk_size=0: from the budget
        logp = chunked_head.token_log_probs(hidden, weight, ids, chunk, cfg.logit_temperature)  # (N,)
        out += list(logp.cpu().split([len(r) for r in part]))  # row-major: one piece per response
    return out


@torch.no_grad()
def batch_advantages(model, tokenizer, cfg, device, questions, responses, context_texts):
    """{kind: [A (T_i,)]} for context_texts = {kind: [text per response]}. Teacher = the base
    model (adapter off) with the context; student = the model as it is, without context."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    student_prompts = [contexts.student_prompt_ids(tokenizer, q, cfg.prompts, cfg.student_thinking)
                       for q in questions]
    student_logp = response_logp(model, cfg, student_prompts, responses, pad, device)
    out = {}
    for kind, texts in context_texts.items():
        teacher_prompts = [contexts.teacher_prompt_ids(tokenizer, q, c, kind, cfg.prompts,
                                                       cfg.teacher_thinking, cfg.max_context_tokens)
                           for q, c in zip(questions, texts)]
        with model.disable_adapter():  # the teacher: the initial base model, no gradient
            teacher_logp = response_logp(model, cfg, teacher_prompts, responses, pad, device)
        out[kind] = [t - s for t, s in zip(teacher_logp, student_logp)]
    model.train(was_training)
    return out


def token_advantages(model, tokenizer, question, response_ids, context_text, kind, cfg, device):
    """A_t (T,) of one response under one context `kind` (see KINDS)."""
    return batch_advantages(model, tokenizer, cfg, device, [question], [response_ids],
                            {kind: [context_text]})[kind][0]


FOCUS_FLOOR = 0.01  # nats: the least mean |A| on a prefix that a focus ratio divides by


def advantage_summary(A, prefix_mask, wrong_mask, after_mask, prefix_has_step=True):
    """Mean A_t on the correct prefix, on the first wrong step and after it, mean |A| on the prefix
    (`prefix_abs`), and the error-focus ratio |mean A on the wrong step| / max(prefix_abs,
    FOCUS_FLOOR). None where undefined. The prefix statistics need a correct step before the wrong
    one: with step 1 wrong the prefix is that step's tag alone, a forced token with A ≈ 0, and the
    ratio came out near 10^5. The floor is there because a prefix that teacher and student score
    alike (|A| → 0, which is what a good critique does) would send one rollout's ratio to infinity:
    below 0.01 nats (a 1 % probability ratio) I call the prefix untouched, so one rollout's ratio
    is at most 100·|mean A on the wrong step| and a median over rollouts stays readable."""
    def mean(x):
        return x.mean().item() if x.numel() else None
    out = {"prefix": mean(A[prefix_mask]), "wrong": mean(A[wrong_mask]), "after": mean(A[after_mask])}
    out["prefix_abs"] = mean(A[prefix_mask].abs())
    if not prefix_has_step:
        out["prefix"] = out["prefix_abs"] = None
    defined = out["wrong"] is not None and out["prefix_abs"] is not None
    out["focus"] = abs(out["wrong"]) / max(out["prefix_abs"], FOCUS_FLOOR) if defined else None
    return out


def spread(values):
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


# ---------------------------------------------------------------------------------------------
# Rollouts to analyse, their steps, and the contexts (two of them controls).


first_wrong_step = contexts.first_differing_step


def wrong_rollouts(model, tokenizer, cfg, device, records, judge, limit):
    """Up to `limit` rollouts with reward 0 and a locatable first wrong step. A record may carry
    its own `response_ids` (and `critique`); the others get one fresh sample from the model."""
    chosen = []
    for start in range(0, len(records), max(4 * limit, 16)):
        batch = records[start:start + max(4 * limit, 16)]
        fresh = [i for i, r in enumerate(batch) if "response_ids" not in r]
        prompts = [contexts.student_prompt_ids(tokenizer, batch[i]["question"], cfg.prompts,
                                               cfg.student_thinking) for i in fresh]
        sampled = dict(zip(fresh, sampler.generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature,
                                                  cfg.top_p, cfg.top_k, cfg.generation_batch)[0])) if fresh else {}
        for i, record in enumerate(batch):
            ids = record.get("response_ids") or sampled[i]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if critic.reward(text, record["answer"], world.exact_answers(cfg)):
                continue
            critique = record.get("critique") or judge([record["question"]], [text],
                                                       [record.get("solution", "")], [record["answer"]])[0]
            wrong = first_wrong_step(text, critique)
            if wrong is not None and critic.validate_critique(text, critique)[0]:
                chosen.append({**record, "response_ids": list(ids), "text": text,
                               "critique": critique, "wrong_step": wrong})
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def analysis_contexts(cfg, item, kinds):
    """The context text of each kind for one rollout: the reference, the critique and the paper's
    two controls (contexts.critique_form). In the toy world the no-prefix control rewrites every
    step in the reference-only surface form (same route and values, another phrasing). The
    reference is the record's `solution` (under the toy world's alignment dial, the dial's
    reference: world.load_records)."""
    restyle = world.toy_restyle(cfg)
    return {kind: item["solution"] if kind == "reference" else
            contexts.critique_form(kind, item["text"], item["critique"], restyle) for kind in kinds}


def analyze_rollouts(model, tokenizer, cfg, device, items, kinds=KINDS):
    """A_t under every context for each rollout: JSON-ready dicts (tokens, A per kind, step
    boundaries, wrong span, summary per kind). Rollouts whose wrong step cannot be located are dropped."""
    pieces = [contexts.token_pieces(tokenizer, it["response_ids"]) for it in items]
    located = [(it, p, *contexts.step_regions(p, it["wrong_step"])) for it, p in zip(items, pieces)]
    located = [entry for entry in located if entry[3] is not None]
    if not located:
        return []
    texts = [analysis_contexts(cfg, it, kinds) for it, *_ in located]
    A = batch_advantages(model, tokenizer, cfg, device, [it["question"] for it, *_ in located],
                         [it["response_ids"] for it, *_ in located],
                         {kind: [t[kind] for t in texts] for kind in kinds})
    results = []
    for i, (item, tokens, boundaries, masks) in enumerate(located):
        wrong = masks[1].nonzero().flatten().tolist()
        results.append({
            "question": item["question"], "answer": item["answer"], "response": item["text"],
            "tokens": tokens, "step_starts": boundaries,
            "wrong_step": item["wrong_step"] + 1, "wrong_span": [wrong[0], wrong[-1] + 1] if wrong else None,
            "contexts": {kind: {"text": texts[i][kind], "A": [round(a, 4) for a in A[kind][i].tolist()]}
                         for kind in kinds},
            "summary": {kind: advantage_summary(A[kind][i], *masks, prefix_has_step=item["wrong_step"] > 0)
                        for kind in kinds}})
    return results


def summarize_contexts(results, kinds):
    """Per context and statistic: mean, std and n over rollouts; plus the pooled error-focus ratio
    |mean A on the wrong step| / mean of mean |A| on the prefix, both over the rollouts that have a
    correct step before the wrong one. A per-rollout ratio is noisy (see advantage_summary), so
    the pooled ratio is the headline and the per-rollout median stands beside it."""
    out = {}
    for kind in kinds:
        out[kind] = {stat: spread([r["summary"][kind].get(stat) for r in results])
                     for stat in ("prefix", "wrong", "after", "focus", "prefix_abs")}
        with_prefix = [r["summary"][kind] for r in results
                       if r["summary"][kind]["prefix_abs"] is not None and r["summary"][kind]["wrong"] is not None]
        wrong = spread([s["wrong"] for s in with_prefix])["mean"]
        scale = spread([s["prefix_abs"] for s in with_prefix])["mean"]
        ratios = [s["focus"] for s in with_prefix if s["focus"] is not None]
        out[kind]["focus_pooled"] = {
            "mean": abs(wrong) / max(scale, FOCUS_FLOOR) if with_prefix else None,
            "median_per_rollout": statistics.median(ratios) if ratios else None, "n": len(ratios)}
    return out


# ---------------------------------------------------------------------------------------------
# Analysis output: HTML (self-contained), JSON, and Fig. 4-style PNGs when matplotlib exists.

CSS = """body{font-family:sans-serif;margin:2em;max-width:70em}
.r{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:.5em}
.s{border-left:2px solid #222;padding-left:1px}.w{box-shadow:inset 0 -3px 0 #000}
details{margin:.3em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em}
table{border-collapse:collapse}td,th{padding:.2em .7em;text-align:right;border-bottom:1px solid #ddd}
td{white-space:nowrap}td:first-child,th:first-child{text-align:left}"""
COLOUR_PERCENTILE = 95  # full colour at this percentile of |A_t| over the page; larger values saturate
ALIGN_WINDOW = 40  # the pooled figure: tokens either side of the first wrong step's start


def colour_scale(results, kinds):
    """|A_t| (nats) drawn at full colour: the COLOUR_PERCENTILE-th percentile of |A_t| over every
    token of every rollout and context on the page, so colours use the range the data has (a fixed
    scale left most tokens nearly white); 1.0 if every A_t is 0."""
    values = torch.tensor([abs(a) for r in results for kind in kinds for a in r["contexts"][kind]["A"]])
    scale = torch.quantile(values, COLOUR_PERCENTILE / 100).item() if values.numel() else 0.0
    return scale or 1.0


# One diverging pair everywhere A_t is shown (this page, its PNGs, explain.py's terminal colours):
# red where the context says change the token (A_t < 0), blue where it says keep it. Red and blue
# stay apart for the common colour-vision deficiencies, which red and green do not.
CHANGE_RGB, KEEP_RGB = (215, 48, 39), (69, 117, 180)


def token_html(piece, a, is_boundary, is_wrong, scale):
    """One token as a coloured span, escaped: <, >, & and quotes as entities, newlines as ↵."""
    rgb = ",".join(map(str, CHANGE_RGB if a < 0 else KEEP_RGB))  # red: change it; blue: keep it
    alpha = min(abs(a) / scale, 1.0)
    classes = " ".join(c for c, on in (("s", is_boundary), ("w", is_wrong)) if on)
    classes = f' class="{classes}"' if classes else ""
    title = html.escape(f"A = {a:+.3f}   {piece!r}", quote=True)
    shown = html.escape(piece, quote=True).replace("\n", "↵<br>")
    return f'<span{classes} style="background:rgba({rgb},{alpha:.2f})" title="{title}">{shown}</span>'


def number(value, signed=True, digits=3):
    return "n/a" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_html(summary):
    """The page's first table: per context, mean ± std over rollouts of mean A_t per region, and
    the error focus (pooled, and the median of the per-rollout ratios)."""
    head = ("<tr><th>context</th><th>rollouts</th><th>with a correct prefix</th><th>A on the correct prefix</th>"
            "<th>A on the first wrong step</th><th>A after it</th><th>error focus, pooled</th>"
            "<th>focus, median per rollout</th></tr>")
    rows = []
    for kind, s in summary.items():
        cells = [f"{number(s[stat]['mean'])} ± {number(s[stat]['std'], False)}"
                 for stat in ("prefix", "wrong", "after")]
        focus = s["focus_pooled"]
        rows.append(f"<tr><td>{html.escape(kind)}</td><td>{s['wrong']['n']}</td><td>{focus['n']}</td><td>"
                    + "</td><td>".join(cells) + f"</td><td>{number(focus['mean'], False, 2)}</td>"
                    f"<td>{number(focus['median_per_rollout'], False, 2)}</td></tr>")
    return (f"<table>{head}{''.join(rows)}</table><p>A in nats, mean ± std over rollouts. The prefix and the "
            f"error focus (|mean A on the wrong step| / mean |A| on the prefix) need a correct step before the "
            f"wrong one, so they are over the rollouts that have one; a per-rollout ratio divides by at least "
            f"{FOCUS_FLOOR:g} nats.</p>")


def render_html(results, kinds, heading, summary=None):
    scale = colour_scale(results, kinds)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(heading)}</h1>",
             summary_html(summary) if summary else "",
             f"<p>A<sub>t</sub> = log π<sub>T</sub>(y<sub>t</sub>|x,c,y<sub>&lt;t</sub>) − log π<sub>θ</sub>"
             f"(y<sub>t</sub>|x,y<sub>&lt;t</sub>): <span style='background:rgba(215,48,39,.8)'>negative"
             f"</span> change it, <span style='background:rgba(69,117,180,.8)'>positive</span> keep it "
             f"(full colour at |A| ≥ {scale:.3g} nats, the {COLOUR_PERCENTILE}th percentile of |A| on this page). "
             f"A bar opens each step tag; the first wrong step is underlined. Hover a token for its value.</p>"]
    for n, r in enumerate(results, start=1):
        parts.append(f"<h2>Rollout {n}: {html.escape(r['question'])} (gold {html.escape(str(r['answer']))}, "
                     f"first wrong step {r['wrong_step']})</h2>")
        wrong = range(*r["wrong_span"]) if r["wrong_span"] else range(0)
        for kind in kinds:
            ctx, s = r["contexts"][kind], r["summary"][kind]
            stats = (f"prefix {number(s['prefix'], digits=2)}, wrong step {number(s['wrong'], digits=2)}, "
                     f"after {number(s['after'], digits=2)}, focus {number(s['focus'], False, 1)}")
            spans = "".join(token_html(p, a, t in r["step_starts"], t in wrong, scale)
                            for t, (p, a) in enumerate(zip(r["tokens"], ctx["A"])))
            parts.append(f"<h3>{kind}</h3><p>{stats}</p><details><summary>context</summary>"
                         f"<pre>{html.escape(ctx['text'])}</pre></details><div class='r'>{spans}</div>")
    return "\n".join(parts + ["</body></html>"])


def aligned_advantages(results, kinds, window=ALIGN_WINDOW):
    """Fig. 4 pooled over rollouts: per context, mean A_t and its standard error at each token offset
    from the first wrong step's start (offset 0 = its first token after the tag), -window..window,
    with n = the rollouts that have a token at that offset."""
    out = {}
    for kind in kinds:
        by_offset = {offset: [] for offset in range(-window, window + 1)}
        for r in (r for r in results if r["wrong_span"]):
            start = r["wrong_span"][0]
            for t, a in enumerate(r["contexts"][kind]["A"]):
                if -window <= t - start <= window:
                    by_offset[t - start].append(a)
        kept = [(o, v) for o, v in by_offset.items() if v]
        out[kind] = {"offset": [o for o, _ in kept], "mean": [statistics.fmean(v) for _, v in kept],
                     "se": [statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else None for _, v in kept],
                     "n": [len(v) for _, v in kept]}
    return out


def plot_aligned(aligned, results, path, heading=""):
    """The pooled Fig. 4: mean A_t over rollouts against the offset from the first wrong step, one
    line per context, ± 2 standard errors, where at least a fifth of the rollouts reach."""
    plt = common.pyplot()
    if plt is None:
        return None
    least = max(2, math.ceil(len(results) / 5))
    lengths = [r["wrong_span"][1] - r["wrong_span"][0] for r in results if r["wrong_span"]]
    if not lengths:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.axvspan(0, statistics.median(lengths), color="0.5", alpha=0.12,
               label=f"first wrong step (median length {statistics.median(lengths):g} tokens)")
    ax.axhline(0, color="0.6", linewidth=0.8)
    for kind, curve in aligned.items():
        points = [(offset, mean, se) for offset, mean, se, n in
                  zip(curve["offset"], curve["mean"], curve["se"], curve["n"]) if n >= least]
        if not points:
            continue
        offsets, means, errors = zip(*points)
        line, = ax.plot(offsets, means, linewidth=1.4, label=kind)
        ax.fill_between(offsets, [m - 2 * se for m, se in zip(means, errors)],
                        [m + 2 * se for m, se in zip(means, errors)], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("token offset from the start of the first wrong step")
    ax.set_ylabel("mean A_t (nats)")
    ax.set_title(f"{heading}: {len(results)} wrong rollouts aligned at the first wrong step\n"
                 f"line: mean over rollouts; band: ± 2 standard errors (offsets that ≥ {least} rollouts reach)",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_png(result, kinds, path):
    """Fig. 4's layout: A_t along one rollout, one panel per context, the first error marked."""
    plt = common.pyplot()
    if plt is None:
        return None  # optional: the HTML and JSON carry the same numbers
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 2.2 * len(kinds)), sharex=True, sharey=True,
                             squeeze=False)  # one y scale: magnitudes compare across contexts
    change, keep = (tuple(c / 255 for c in rgb) for rgb in (CHANGE_RGB, KEEP_RGB))
    for ax, kind in zip(axes[:, 0], kinds):
        A = result["contexts"][kind]["A"]
        ax.bar(range(len(A)), A, width=1.0, color=[change if a < 0 else keep for a in A])
        for boundary in result["step_starts"]:
            ax.axvline(boundary, color="0.85", linewidth=0.8, zorder=0)
        if result["wrong_span"]:
            ax.axvspan(*result["wrong_span"], color="0.5", alpha=0.15, zorder=0)  # the first wrong step
        ax.set_ylabel("A_t")
        ax.set_title(kind, fontsize=9)
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=keep, label="A_t > 0: the context says keep the token"),
                        Patch(color=change, label="A_t < 0: the context says change it"),
                        Patch(color="0.5", alpha=0.15, label="the first wrong step"),
                        Patch(color="0.85", label="step boundaries (lines)")],
               fontsize=7, loc="upper center", ncol=4, frameon=False)
    ticks = [t for t in result["step_starts"] if t < len(result["tokens"])]  # the step tags' tokens
    axes[-1, 0].set_xticks(ticks, [result["tokens"][t].strip() or "·" for t in ticks], fontsize=7, rotation=45)
    axes[-1, 0].set_xlabel("response token (ticks: where each step starts)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.2 * len(kinds))))  # room for the legend
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def analyze(target, overrides=(), step=0, rollouts=8, out=None):
    cfg, run_dir = target_config(target, overrides)
    device = common.pick_device(cfg)
    model_path, _, test_path = world.resolve_paths(cfg)
    records = world.load_records(cfg, test_path, need_solution=cfg.model != "toy")
    steps = checkpoint_steps(run_dir) if run_dir else {0: None}
    if step not in steps:
        raise UserError(f"no checkpoint for step {step}; available: {sorted(steps)}")
    judge = world.make_judge(cfg, device, records)  # the rule critic reads toy chains only: one line for other data
    if steps[step]:
        check_adapter_base(steps[step], model_path, run_dir)  # the base it was trained on, by contents
    model, tokenizer = common.load_model(cfg, model_path, device)
    try:
        load_adapter(model, steps[step])
    except (*runfolder.DAMAGED, SafetensorError) as e:  # NaN weights: NonFiniteAdapter, already one line
        if isinstance(e, UserError):
            raise
        raise UserError(f"the checkpoint {steps[step]} is damaged and does not load ({type(e).__name__}); "
                        f"analyse another --step") from None
    torch.manual_seed(cfg.seed)
    items = wrong_rollouts(model, tokenizer, cfg, device, records, judge, rollouts)
    results = analyze_rollouts(model, tokenizer, cfg, device, items)
    if not results:
        raise UserError("found no wrong rollout with a locatable first wrong step to analyse")
    summary = summarize_contexts(results, KINDS)
    aligned = aligned_advantages(results, KINDS)
    # a run's analysis lives in the run; a model's in ./analysis/NAME, so two models never overwrite
    out = out or (os.path.join(run_dir, "analysis") if run_dir else
                  os.path.join("analysis", os.path.basename(os.path.normpath(target))))
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"advantage_step_{step:06d}")
    with open(stem + ".json", "w") as f:
        json.dump({"target": target, "step": step, "summary": summary, "colour_scale": colour_scale(results, KINDS),
                   "aligned": aligned, "rollouts": results}, f)
    with open(stem + ".html", "w") as f:
        f.write(render_html(results, KINDS, f"Per-token advantage: {target}, step {step}", summary))
    pngs = [p for p in (plot_png(results[0], KINDS, stem + ".png"),
                        plot_aligned(aligned, results, stem + "_aligned.png", f"{target}, step {step}")) if p]
    print(f"{len(results)} rollouts; mean ± std over rollouts")
    for kind, stats in summary.items():
        print(f"{kind:>20}: " + "  ".join(
            f"{stat} {s['mean']:+.3f}±{s['std'] or 0:.3f}" if s["mean"] is not None else f"{stat} n/a"
            for stat, s in stats.items() if stat in ("prefix", "wrong", "after")))
        pooled = stats["focus_pooled"]
        if pooled["mean"] is not None:
            print(f"{'':>20}  error focus (pooled) {pooled['mean']:.2f}, per-rollout median "
                  f"{pooled['median_per_rollout']:.2f} (n {pooled['n']})")
    print(f"wrote {stem}.html, {stem}.json" + "".join(f", {p}" for p in pngs)
          + ("" if pngs else f" (for the PNGs: pip install {common.MATPLOTLIB})"))
    return summary


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = options.Parser(
        description="Per-token advantage analysis (Fig. 4): an HTML page, a JSON and optional PNGs.",
        epilog=__doc__[__doc__.index("Commands:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="a run folder, a model folder or 'toy'")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--step", type=int, default=0, help="checkpoint step (0 = base)")
    parser.add_argument("--rollouts", type=int, default=8, help="wrong rollouts to show")
    parser.add_argument("--out", help="output folder (default RUN/analysis or ./analysis/NAME)")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    common.default_signals()  # Ctrl-C: one line (user_errors)
    with common.user_errors():
        if args.rollouts < 1:
            raise UserError(f"--rollouts must be at least 1, got {args.rollouts}")
        analyze(args.target, args.overrides, args.step, args.rollouts, args.out)


if __name__ == "__main__":
    main()
