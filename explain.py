"""One training step shown: `python explain.py --context ARM [--explain N] [--config FILE] [key=value ...]`
takes selfdistill.py's arguments and shows the first step of that run (the toy world by default)
for N rollouts (default 2): the question, the student's response, the critic's critique (or the
reference), the teacher's context as the teacher sees it (its decoded prompt), the response's
tokens marked by A_t = log π_T(ŷ_t) − log π_θ(ŷ_t), the rollout's divergence, and the step's loss;
for grpo the group's rewards and advantages instead. It runs the loop's own named steps and its
micro-batch loss (selfdistill.sample_rollouts, judge_rollouts, kept_rollouts, micro_batch_loss),
one rollout at a time with the step's divisor (so the rollouts' losses sum to the step's loss), then
stops: no update, no run folder, no checkpoint. A_t is coloured on a terminal (blue: the teacher
likes the token more than the student does; red: less, analyze.py's colours) and written `[+0.12]`
after it when the output is piped; tokens with |A_t| below SHOWN (0.05) are left unmarked.
"""
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    import os
    import signal
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch

from plumbing import common
import contexts
import selfdistill as loop
from toyworld import world

# ---------------------------------------------------------------------------------------------
# Printing


SHOWN = 0.05  # |A_t| below this is left unmarked: the context barely moves that token


def marked(pieces, values, colour):
    """Each token's text, marked by its value where |A_t| ≥ SHOWN: ANSI-coloured on a terminal,
    followed by `[+0.12]` when piped (the few informative values, not a [+0.00] on every token)."""
    out = []
    for piece, a in zip(pieces, values):
        piece = piece.replace("\n", "⏎\n")
        if abs(a) < SHOWN:
            out.append(piece)
        elif colour:
            shade = 34 if a > 0 else 31  # blue: keep the token; red: change it (analyze.py's pair)
            out.append(f"\033[{1 if abs(a) >= 1 else 0};{shade}m{piece}\033[0m")
        else:
            out.append(f"{piece}[{a:+.2f}]")
    return "".join(out)


def block(title, text):
    print(f"--- {title}\n{text.rstrip()}")


# ---------------------------------------------------------------------------------------------
# One step, shown


def show_step(cfg, n_shown):
    device = common.pick_device(cfg)
    model_path, train_path, _ = world.resolve_paths(cfg)
    records = world.load_records(cfg, train_path, need_solution=cfg.arm == "reference")
    judge = world.make_judge(cfg, device, records) if cfg.arm.startswith("critique") else None
    model, tokenizer = common.load_model(cfg, model_path, device)
    G, step, colour = cfg.samples_per_question, 0, sys.stdout.isatty()
    torch.manual_seed(common.step_seed(cfg, step))
    batch = [records[i] for i in common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)]
    rollouts = loop.sample_rollouts(cfg, model, tokenizer, batch, step, 0, world.exact_answers(cfg))
    loop.judge_rollouts(cfg, judge, rollouts, False)
    kept = loop.kept_rollouts(cfg, tokenizer, rollouts)
    keep, divisor, advantages = kept.index, kept.divisor, kept.advantages
    model.eval()  # no dropout: the numbers shown are the step's, without noise
    step_loss, shown, timer = 0.0, {}, common.Timer(device)
    for i in keep:  # each kept rollout alone, divided by the whole step's divisor: Σ_i = the step's loss
        with torch.no_grad():  # the loop's own micro-batch loss, on a micro-batch of one
            loss, stats = loop.micro_batch_loss(cfg, model, tokenizer, rollouts, kept, [i], timer,
                                                analyse=cfg.arm != "grpo")
        step_loss += loss.item()
        shown[i] = (loss.item() * divisor, stats["advantage"][0].tolist() if cfg.arm != "grpo" else None)
    rewards, texts, truncated = rollouts.rewards, rollouts.texts, rollouts.truncated
    with_signal = [i for i in shown if cfg.arm != "grpo" or advantages[i] != 0]  # grpo: A_i ≠ 0 first
    for number, i in enumerate((with_signal or list(shown))[:n_shown], start=1):
        value, A_t = shown[i]
        print(f"\n=== rollout {number} of {len(keep)} kept ({cfg.arm}, step 1, reward {rewards[i]:.0f}"
              f"{', truncated' if truncated[i] else ''})")
        block("question", rollouts.records[i]["question"])
        block("student's response ŷ (it saw the question only)", texts[i])
        if cfg.arm == "grpo":
            group = slice(i - i % G, i - i % G + G)
            print(f"--- its group's rewards r: {rewards[group].tolist()}\n--- advantages A = (r − mean r) / "
                  f"(std r + ε): {[round(a, 2) for a in advantages[group].tolist()]}; this one A_i = "
                  f"{advantages[i]:+.3f}\n--- its loss term (÷ the step's {cfg.grpo_norm} divisor {divisor}): "
                  f"{value / divisor:+.5f}")
            continue
        if cfg.arm.startswith("critique"):
            block("the critic's critique", rollouts.critiques[i])
        block("the teacher's context, as the teacher sees it (decoded prompt; then ŷ follows)",
              tokenizer.decode(kept.teacher_ids[i], skip_special_tokens=False))
        block("ŷ's tokens with A_t = log π_T(ŷ_t) − log π_θ(ŷ_t)" + (" (blue +, red −)" if colour else ""),
              marked(contexts.token_pieces(tokenizer, rollouts.responses[i]), A_t, colour))
        print(f"--- divergence 1/|ŷ| Σ_t {cfg.divergence} KL: {value:.4f}  (Σ_t A_t = {sum(A_t):+.3f})")
    why = "A_i = 0" if cfg.arm == "grpo" else "an invalid critique" if cfg.arm.startswith("critique") else "-"
    n = len(rollouts.records)
    print(f"\n=== step 1 loss {step_loss:.6g} over {len(keep)} kept rollouts of {n} "
          f"({n - len(keep)} dropped, for {why}); divisor {divisor}. Nothing was updated or written.")


def main(argv=None):
    with common.user_errors():
        cfg, n_shown = loop.parse_args(sys.argv[1:] if argv is None else argv)
        show_step(cfg, n_shown or 2)


if __name__ == "__main__":
    main()
