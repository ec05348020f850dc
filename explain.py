"""`python selfdistill.py --context ARM --explain [N]`: the first training step of the configured run
(the toy world by default), shown for N rollouts (default 2): the question, the student's response,
the critic's critique (or the reference), the teacher's context as the teacher sees it (its decoded
prompt), the response's tokens marked by A_t = log π_T(ŷ_t) − log π_θ(ŷ_t), the rollout's
divergence, and the step's loss; for grpo the group's rewards and advantages instead. It runs the
loop's own named steps (selfdistill.sample_rollouts, judge_rollouts, kept_rollouts, teacher_inputs)
and losses, one rollout at a time with the step's divisor (so the rollouts' losses sum to the step's
loss), then stops: no update, no run folder, no checkpoint. A_t is coloured on a terminal (green:
the teacher likes the token more than the student does) and written `[+0.12]` after each token when
the output is piped. The loop's module is passed in (`loop`: selfdistill), so this file sits
below it in the import order.
"""
import sys

import torch

import chunked_head
import common
import contexts
import critic
import world

# ---------------------------------------------------------------------------------------------
# Printing


def marked(pieces, values, colour):
    """Each token's text followed by its value: ANSI-coloured on a terminal, `tok[+0.12]` piped."""
    out = []
    for piece, a in zip(pieces, values):
        piece = piece.replace("\n", "⏎\n")
        if colour:
            shade = 32 if a > 0 else 31  # green: the teacher raises the token; red: lowers it
            out.append(f"\033[{1 if abs(a) >= 1 else 0};{shade}m{piece}\033[0m" if abs(a) >= 0.05 else piece)
        else:
            out.append(f"{piece}[{a:+.2f}]")
    return "".join(out)


def block(title, text):
    print(f"--- {title}\n{text.rstrip()}")


# ---------------------------------------------------------------------------------------------
# One step, shown


def show_step(cfg, n_shown, loop):
    device = common.pick_device(cfg)
    model_path, train_path, _ = world.resolve_paths(cfg)
    records = world.load_records(cfg, train_path, need_solution=cfg.arm == "reference")
    judge = world.make_judge(cfg, device, records) if cfg.arm.startswith("critique") else None
    model, tokenizer = common.load_model(cfg, model_path, device)
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d)
    G, step, colour = cfg.samples_per_question, 0, sys.stdout.isatty()
    torch.manual_seed(common.step_seed(cfg, step))
    per_rollout = [records[i] for i in common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)
                   for _ in range(G)]
    prompt_ids, responses, truncated, texts = loop.sample_rollouts(cfg, model, tokenizer, per_rollout, step, 0)
    rewards = torch.tensor([critic.reward(t, r["answer"], world.exact_answers(cfg))
                            for t, r in zip(texts, per_rollout)])
    critiques, verdicts, context_texts, _ = loop.judge_rollouts(cfg, judge, per_rollout, texts, False)
    keep, divisor, _, advantages = loop.kept_rollouts(cfg, rewards, responses, verdicts)
    if cfg.arm != "grpo":
        teacher_ids, span_ends = loop.teacher_inputs(cfg, tokenizer, per_rollout, responses, critiques,
                                                     context_texts, keep)
    model.eval()  # no dropout: the numbers shown are the step's, without noise
    step_loss, shown = 0.0, {}
    for i in keep:  # each kept rollout alone, divided by the whole step's divisor: Σ_i = the step's loss
        rows = contexts.build_rows([prompt_ids[i]], [responses[i]], tokenizer.pad_token_id)
        mask = rows["response_mask"].to(device)  # (1, T)
        T = mask.shape[1]
        sampled_ids = rows["input_ids"][:, -T:].to(device)[mask]  # (N,)
        with torch.no_grad():
            student_h = chunked_head.response_hidden(model, rows, T, device)[mask]  # (N, d)
            if cfg.arm == "grpo":
                reference_h = None
                if cfg.grpo_beta:  # π_ref: the base, adapter off
                    with model.disable_adapter():
                        reference_h = chunked_head.response_hidden(model, rows, T, device)[mask]
                loss, _ = loop.grpo_loss(student_h, weight, sampled_ids, advantages[[i]].to(device), mask,
                                         divisor, cfg, reference_h)
                A_t = None
            else:  # the teacher: x with its context c, then the same ŷ; adapter off (teacher=base)
                _, teacher_rows = contexts.build_pair([prompt_ids[i]], [teacher_ids[i]], [responses[i]],
                                                      tokenizer.pad_token_id)
                with loop.teacher_weights(model, cfg.teacher, {}):
                    teacher_h = chunked_head.response_hidden(model, teacher_rows, T, device)[mask]
                span = contexts.distilled_span(mask, [span_ends[i]])
                loss, stats = loop.sd_loss(student_h, teacher_h, weight, sampled_ids, mask, span, divisor,
                                           cfg, with_advantage=True)
                A_t = stats["advantage"].tolist()
        step_loss += loss.item()
        shown[i] = (loss.item() * divisor, A_t)  # SD: the rollout's divergence
    with_signal = [i for i in shown if cfg.arm != "grpo" or advantages[i] != 0]  # grpo: A_i ≠ 0 first
    for number, i in enumerate((with_signal or list(shown))[:n_shown], start=1):
        value, A_t = shown[i]
        print(f"\n=== rollout {number} of {len(keep)} kept ({cfg.arm}, step 1, reward {rewards[i]:.0f}"
              f"{', truncated' if truncated[i] else ''})")
        block("question", per_rollout[i]["question"])
        block("student's response ŷ (it saw the question only)", texts[i])
        if cfg.arm == "grpo":
            group = slice(i - i % G, i - i % G + G)
            print(f"--- its group's rewards r: {rewards[group].tolist()}\n--- advantages A = (r − mean r) / "
                  f"(std r + ε): {[round(a, 2) for a in advantages[group].tolist()]}; this one A_i = "
                  f"{advantages[i]:+.3f}\n--- its loss term (÷ the step's {cfg.grpo_norm} divisor {divisor}): "
                  f"{value / divisor:+.5f}")
            continue
        if cfg.arm.startswith("critique"):
            block("the critic's critique", critiques[i])
        block("the teacher's context, as the teacher sees it (decoded prompt; then ŷ follows)",
              tokenizer.decode(teacher_ids[i], skip_special_tokens=False))
        block("ŷ's tokens with A_t = log π_T(ŷ_t) − log π_θ(ŷ_t)" + (" (green +, red −)" if colour else ""),
              marked(contexts.token_pieces(tokenizer, responses[i]), A_t, colour))
        print(f"--- divergence 1/|ŷ| Σ_t {cfg.divergence} KL: {value:.4f}  (Σ_t A_t = {sum(A_t):+.3f})")
    why = "A_i = 0" if cfg.arm == "grpo" else "an invalid critique" if cfg.arm.startswith("critique") else "-"
    print(f"\n=== step 1 loss {step_loss:.6g} over {len(keep)} kept rollouts of {len(per_rollout)} "
          f"({len(per_rollout) - len(keep)} dropped, for {why}); divisor {divisor}. Nothing was updated or written.")
