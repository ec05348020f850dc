"""selfdistill: self-distillation with designed feedback, after "The Role of Feedback Alignment in
Self-Distillation" (Kara & Ersoy 2026). One model is the student π_θ(·|x) and, with its LoRA
adapter switched off, its own teacher π_T(·|x, c). On the student's own samples ŷ we minimise

    L_SD(θ) = E_x E_ŷ [ 1/|ŷ| Σ_t KL( sg π_T(·|x,c,ŷ<t) ‖ π_θ(·|x,ŷ<t) ) ]        (forward KL)

and compare arms that differ only in the context c: `grpo` (no teacher: binary reward,
group-normalised policy gradient), `reference` (a reference solution) and `critique` (a
step-aligned critique of ŷ from a frozen critic), plus the paper's two critique-form controls
`critique_quoting` (the wrong step quoted before its fix) and `critique_no_prefix` (the fix
without the solver's own tokens).

Deviations from the paper, and the choices it leaves open (each a config field):
 1. The teacher is the base model (LoRA off), as in the paper; `teacher=ema|live` are ablations.
    The EMA is of the adapter *update* ΔW = s·BA, kept dense, and is saved in checkpoints.
 2. Divergences use logits / `logit_temperature` on both sides (default 1.0, the model's own
    distributions; the paper samples at 1.1 and does not say what the loss uses).
 3. Unknown in the paper, chosen here: constant learning rate, no warm-up, grad clip 1.0, no
    weight decay, no per-token clipping, top-p 1, top-k off.
 4. GRPO (grpo.py): one on-policy update per batch (ratio 1, no clip), std with Bessel's
    correction. Samples with A_i = 0 (a group whose rewards are all equal) carry no signal and are
    dropped (kept when grpo_beta > 0: the KL term still acts on them). `grpo_norm` divides
    Σ_i Σ_t −A_i·log π_θ(ŷ_it): token_mean (default) by the step's kept tokens; sequence_mean
    (the GRPO paper's) takes each sequence's token mean, then the mean over kept sequences;
    constant (Dr. GRPO's) by max_new_tokens × the step's rollouts (batch_size·G).
 5. `grpo_beta` > 0 adds β·KL(π_θ ‖ π_ref) per token, π_ref = the base (adapter off, one no-grad
    forward, no second model), with the k3 estimator r − log r − 1, r = π_ref(ŷ_t)/π_θ(ŷ_t), as TRL
    and DeepSeekMath do; default 0, as in TRL (the paper's GRPO arm names no KL term).
 6. A critique that fails validation (critic.validate_critique at `critique_validation`), or that
    never came back whole (the critic failed, or reached `critic_max_new_tokens`), drops its sample
    from the loss, counted in `train/critique_invalid` and by reason in `train/dropped/REASON`; it
    is never replaced by anything else.
 7. A teacher context longer than `max_context_tokens` loses its middle (marked); the question
    and the final instruction are never cut.
 8. The student's chat template runs with thinking off; the teacher's with `teacher_thinking`
    (the paper follows OPSD: on; our default off, since the toy template has no switch).
 9. The prompts are in our own words (contexts.PROMPTS); the paper's were not released.
10. A step whose loss or gradient norm is not finite skips its update; `max_nonfinite` such
    steps in a row stop the run (after a checkpoint).
11. The reward compares the text after `<answer>` (else the last \\boxed{}) with the gold answer
    through critic.answers_match: math-verify, or an exact integer check in the toy world (the
    paper does not say what it used).

Beyond the paper (settings of ours; the defaults leave the method as above):
 - With no --config the run is the toy world (toyworld/): a 1 M-parameter model on arithmetic
   chains, CPU, minutes. The paper setting is configs/qwen3-1.7b.yaml.
 - `distill_span=through_first_divergence` (an ablation): only the response tokens up to and
   including the first one that leaves the critique's verbatim prefix are distilled, still
   divided by the full response length |ŷ|.
 - `analysis_every` logs the per-token advantage A_t = log π_T(ŷ_t) − log π_θ(ŷ_t) of the arm's
   own teacher on the step's wrong rollouts, from the forward passes the loss already made.

Commands (all of them: the README's "Running"):
    python selfdistill.py --context critique                      # toy world, end to end, CPU
    python selfdistill.py --context reference lr=1e-3 epochs=3    # key=value overrides; --help lists them
    python explain.py --context critique --explain 2              # one step, shown for 2 rollouts
"""
import contextlib
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds, nothing written yet): exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import torch
from tqdm import tqdm

import chunked_head
from plumbing import common
import contexts
import critic
import ema_teacher
from plumbing import options
from plumbing import ranks
from plumbing import runfolder
from plumbing import sampler
from plumbing import tracking
from toyworld import world
from plumbing.common import UserError
from grpo import NORMS, grpo_advantages, grpo_loss, policy_gradient_loss  # noqa: F401 (the baseline)

if __name__ == "__main__":  # imported: Ctrl-C is KeyboardInterrupt again, one line through common.user_errors
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------------------------
# Config: defaults are the toy world; configs/*.yaml hold overrides only.


@dataclass
class Config:
    arm: str = "critique"  # set by --context: grpo (no teacher, reward only) | reference | critique | critique_quoting | critique_no_prefix
    run: str = ""  # run name: runs/NAME; default <arm>-s<seed>; rerunning a name resumes it
    out_dir: str = "runs"  # folder that holds the runs
    seed: int = 0  # seeds data order, sampling and LoRA init
    # model
    model: str = "toy"  # local folder or hub id of a causal LM; "toy" builds/loads the toy world's base
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights and activations)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    trust_remote_code: bool = False  # allow model code from the hub folder (off: safer)
    prompts: str = "auto"  # prompt set: auto (toy for a toy-world model, else instruct) | toy | instruct
    student_thinking: bool = False  # enable_thinking for the student's chat template (if supported)
    teacher_thinking: bool = False  # enable_thinking for the teacher's chat template (paper/OPSD: on)
    lora_r: int = 16  # LoRA rank (paper: 64)
    lora_alpha: int = 32  # LoRA alpha (paper: 128)
    lora_dropout: float = 0.0  # LoRA dropout
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated module names
    gradient_checkpointing: bool = False  # recompute activations in the student's backward (long rows)
    # data
    train_file: str = ""  # JSONL with question, answer, solution; "" = the toy world's
    test_file: str = ""  # JSONL for evaluation; "" = the toy world's
    toy_order: str = "grouped"  # toy reference route: grouped (another derivation) | chain (aligned)
    toy_phrasing: str = "other"  # toy reference wording: other (not the solver's) | same (the solver's)
    # rollouts
    samples_per_question: int = 0  # G; 0 = 8 for grpo, 1 for the self-distillation arms (the paper)
    max_new_tokens: int = 0  # response length limit, cut and flagged; 0 = the toy world's budget (build.json) for a toy-world model, 512 otherwise
    temperature: float = 1.0  # sampling temperature (paper: 1.1)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    generation_batch: int = 256  # sequences per generate call (memory knob)
    # teacher and loss
    teacher: str = "base"  # base (LoRA off, the paper) | ema (EMA of the LoRA update) | live (current weights)
    ema_rate: float = 0.05  # ema teacher: ΔW_T ← (1 - rate)·ΔW_T + rate·ΔW_θ after every step
    grpo_norm: str = "token_mean"  # grpo loss divisor: token_mean (the step's kept tokens) | sequence_mean (each sequence's token mean, averaged) | constant (max_new_tokens × batch_size·G, Dr. GRPO)
    grpo_beta: float = 0.0  # grpo: weight of the k3 KL penalty to the reference policy (the base, adapter off); 0 = off (TRL's default)
    divergence: str = "forward"  # forward KL(T‖S) | reverse KL(S‖T) | jsd: a·KL(T‖M)+(1-a)·KL(S‖M), M=(1-a)S+aT
    jsd_alpha: float = 0.5  # a of the jsd; a=0 is forward KL, a=1 reverse KL
    support: str = "full"  # full vocabulary | topk | sampled (reverse-KL estimator on ŷ_t)
    topk: int = 100  # k of the topk support
    topk_side: str = "student"  # whose logits pick the top-k: student | teacher
    topk_tail: bool = False  # topk: add a tail bucket log(1-Σp) instead of renormalising over k
    token_clip: float = 0.0  # clip each token's divergence at this value (0 = off)
    logit_temperature: float = 1.0  # both sides' logits are divided by this before the divergence
    distill_span: str = "all"  # all response tokens | through_first_divergence: up to the first token that leaves the critique's verbatim prefix (normalised by the full length)
    chunk_size: int = 128  # response positions per chunk of LM head + divergence (memory knob; 0 = from CHUNK_LOGITS_MB)
    max_context_tokens: int = 1024  # longer teacher contexts lose their middle (marked)
    # optimisation
    batch_size: int = 32  # questions per optimizer step, all processes together (paper: 32)
    micro_batch: int = 32  # sequences per forward/backward; batch_size·G must divide by it
    epochs: float = 7.0  # passes over the train set (paper: 7)
    max_steps: int = 0  # stop after this many steps (0 = from epochs)
    lr: float = 2e-3  # AdamW learning rate (paper, Qwen3-1.7B: 5e-6)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    schedule: str = "constant"  # learning-rate schedule after warm-up: constant | linear | cosine
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    max_nonfinite: int = 3  # stop after this many non-finite steps in a row (each is skipped)
    # critic
    critic: str = "rule"  # rule (toy world) | hf (local model) | http (OpenAI-compatible server)
    critic_model: str = ""  # hf: folder or hub id; http: the served model's name
    critic_url: str = ""  # http: base URL, e.g. http://127.0.0.1:8000/v1
    critic_api_key_env: str = "OPENAI_API_KEY"  # http: environment variable that holds the API key
    critic_timeout: float = 120.0  # http: seconds per request (a critique gets at most 3x this in all, retries included)
    critic_retries: int = 3  # http: retries after a failed request
    critic_max_new_tokens: int = 1024  # critique length limit, thinking included (a critique cut there counts as critique_truncated; so does one that reaches the critic's last position)
    critic_batch: int = 8  # critiques in flight at once: hf's batch (halved on out-of-memory), http's concurrent requests
    critique_validation: str = "full"  # what a critique must pass to enter the loss: full (format, alignment, gold answer) | format (no gold check) | off (any text)
    # logging, checkpoints, evaluation
    sample_every: int = 10  # write samples.jsonl (with the teacher contexts) every N steps
    checkpoint_every: int = 10  # checkpoint every N steps (and at the end)
    analysis_every: int = 0  # log per-token advantage statistics every N steps (0 = off)
    eval_at_end: bool = True  # evaluate every checkpoint on the test set when training ends
    eval_samples: int = 12  # samples per test question for eval (Avg@k, Pass@k, Maj@k)
    eval_questions: int = 0  # test questions to evaluate (0 = all)
    report_to: str = "none"  # also send each metrics line and the eval rows to: none | tensorboard (RUN/tensorboard/) | wandb (WANDB_MODE=offline works); pip install -r requirements-extras.txt


# Settings that change how a run executes, not what it computes: they may change when a run resumes
# (RUN/settings.jsonl records each change with the step it came at) and compare.py ignores them when
# it pools seeds into arms. Every other field is part of the experiment: a resume refuses a change.
OPERATIONAL = ("device", "threads", "micro_batch", "generation_batch", "chunk_size", "gradient_checkpointing",
               "critic_url", "critic_api_key_env", "critic_timeout", "critic_retries", "critic_batch",
               "sample_every", "eval_at_end", "report_to")

# ---------------------------------------------------------------------------------------------
# Divergences: pure functions of logits (the GRPO baseline's loss is in grpo.py). Student first, teacher second; the
# teacher is a target (its logits come from a no_grad forward), the gradient flows into the student.


def support_log_probs(student_logits, teacher_logits, support="full", topk=100, topk_side="student",
                      topk_tail=False, temperature=1.0):
    """Both sides' log-probabilities over the chosen support (..., K), in float32.

    full: K = V. topk: the k largest logits of one side, renormalised over those k (K = k), or
    with one extra tail bucket log(1 - Σ_k p) (K = k + 1). Logits are divided by the same
    temperature on both sides first."""
    s = student_logits.float() / temperature  # (..., V)
    t = teacher_logits.float() / temperature  # (..., V)
    if support == "full":
        return s.log_softmax(-1), t.log_softmax(-1)
    index = (s if topk_side == "student" else t).topk(min(topk, s.shape[-1]), dim=-1).indices
    s_k, t_k = s.gather(-1, index), t.gather(-1, index)  # (..., k): gathered before normalising
    if not topk_tail:
        return s_k.log_softmax(-1), t_k.log_softmax(-1)
    out = []
    for full, part in ((s, s_k), (t, t_k)):
        log_z = full.logsumexp(-1, keepdim=True)  # (..., 1)
        # log(1 − Σ_k p) in log space: 1 − Σ_k p cancels in float32 once the top k hold nearly all
        # the mass. The k entries are set to the most negative float (not −inf, whose logsumexp
        # backward is NaN); with k = V the tail is floored at −1e4, so it contributes exactly 0.
        rest = full.scatter(-1, index, torch.finfo(full.dtype).min).logsumexp(-1, keepdim=True)
        tail = (rest - log_z).clamp(min=-1e4)  # (..., 1)
        out.append(torch.cat([part - log_z, tail], dim=-1))  # (..., k + 1) true log-probabilities
    return out[0], out[1]


def kl(logp, logq):
    """KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v)) over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


def token_divergence(student_logits, teacher_logits, divergence="forward", support="full", topk=100,
                     topk_side="student", topk_tail=False, jsd_alpha=0.5, sampled_ids=None, clip=0.0,
                     temperature=1.0):
    """Per-token divergence (...,) between student S and teacher T at each position.

    forward: KL(T ‖ S) = Σ_v T(v)·(log T(v) − log S(v))       (the paper's, default)
    reverse: KL(S ‖ T) = Σ_v S(v)·(log S(v) − log T(v))
    jsd:     a·KL(T ‖ M) + (1 − a)·KL(S ‖ M),  M = (1 − a)·S + a·T;  a = 0 → forward, a = 1 → reverse
    sampled: reverse-KL estimator on the sampled token y_t, sg(log S(y) − log T(y))·log S(y); its
             value is a surrogate, its expected gradient under y ~ S is ∇ KL(S ‖ T).
    clip > 0 caps each token's value (capped tokens get no gradient)."""
    if support == "sampled":
        s_logp = (student_logits.float() / temperature).log_softmax(-1)
        t_logp = (teacher_logits.float() / temperature).log_softmax(-1)
        s_y = s_logp.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)  # (...,) log S(y_t)
        t_y = t_logp.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)  # (...,) log T(y_t)
        values = (s_y - t_y).detach() * s_y
    else:
        s_logp, t_logp = support_log_probs(student_logits, teacher_logits, support, topk, topk_side,
                                           topk_tail, temperature)
        if divergence == "forward" or (divergence == "jsd" and jsd_alpha == 0.0):
            values = kl(t_logp, s_logp)
        elif divergence == "reverse" or (divergence == "jsd" and jsd_alpha == 1.0):
            values = kl(s_logp, t_logp)
        else:
            a = jsd_alpha
            m_logp = torch.logsumexp(torch.stack([s_logp + math.log(1 - a), t_logp + math.log(a)]), 0)
            values = a * kl(t_logp, m_logp) + (1 - a) * kl(s_logp, m_logp)
    return values.clamp(max=clip) if clip > 0 else values


# ---------------------------------------------------------------------------------------------
# The self-distillation loss on one micro-batch, from hidden states: the LM head and the per-token function run
# chunk by chunk (chunked_head.ChunkedHead), so no (T, V) tensor is held.

def sd_loss(student_h, teacher_h, weight, sampled_ids, mask, span, n_sequences, cfg, with_advantage=False):
    """L_SD on one micro-batch: 1/|ŷ| Σ_{t in span} D(π_T ‖ π_θ)(t), summed over its sequences and
    divided by the step's sequence count. student_h, teacher_h (N, d) at the response positions
    (mask (B, T) True); span (B, T) ⊆ mask: the distilled tokens. Returns (loss, per-token stats).
    Unchunked, and for the default divergence, it is these three lines (what the chunks compute
    without ever holding an (N, V) tensor of both sides; tests/test_divergence.py checks):

        D = kl(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1))       # (N,)
        grid = torch.zeros(mask.shape).masked_scatter(mask, D)                       # (B, T)
        loss = ((grid * span).sum(-1) / mask.sum(-1)).sum() / n_sequences"""
    N = student_h.shape[0]
    entropy, advantage = torch.zeros(N, device=student_h.device), torch.zeros(N, device=student_h.device)

    def diagnostics(student_logits, teacher_logits, positions):  # entropy and A_t; its (C, V) tensors
        s_logp = (student_logits.float() / cfg.logit_temperature).log_softmax(-1)  # die on return
        entropy[positions] = -(s_logp.exp() * s_logp).sum(-1)
        if with_advantage:  # A_t = log π_T(ŷ_t) − log π_θ(ŷ_t)
            y = sampled_ids[positions, None]
            t_logp = (teacher_logits.float() / cfg.logit_temperature).log_softmax(-1)
            advantage[positions] = (t_logp.gather(-1, y) - s_logp.gather(-1, y)).squeeze(-1)

    def per_token(student_logits, positions):  # (C, V) → (C,)
        with torch.no_grad():  # the teacher is a fixed target; entropy and A_t are diagnostics
            teacher_logits = teacher_h[positions] @ weight.T  # (C, V)
            diagnostics(student_logits, teacher_logits, positions)  # done before the divergence's peak
        return token_divergence(student_logits, teacher_logits, divergence=cfg.divergence, support=cfg.support,
                                topk=cfg.topk, topk_side=cfg.topk_side, topk_tail=cfg.topk_tail,
                                jsd_alpha=cfg.jsd_alpha, sampled_ids=sampled_ids[positions],
                                clip=cfg.token_clip, temperature=cfg.logit_temperature)

    values = chunked_head.ChunkedHead.apply(student_h, weight, per_token, cfg.chunk_size)  # (N,) D(t)
    grid = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, values)  # (B, T)
    # 1/|ŷ| Σ_t over the distilled tokens: the divisor is the full response length
    loss = ((grid * span).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    keep = span[mask]  # (N,)
    return loss, {"divergence": (values * keep).sum().item(), "entropy": (entropy * keep).sum().item(),
                  "tokens": int(keep.sum()), "advantage": advantage}


# ---------------------------------------------------------------------------------------------
# The loop's named steps, around one record of a step's rollouts. What the teacher sees, where the
# gradient stops and the loss are in micro_batch_loss; the order of the steps is train()'s.


@contextlib.contextmanager
def teacher_weights(model, teacher, ema):
    """base: the adapter switched off (the initial model); ema: off, plus x·ΔW_Tᵀ added to each
    adapted layer's output (ema_teacher.py); live: the current weights as they are."""
    if teacher == "live":
        yield
        return
    with model.disable_adapter(), ema_teacher.added(model, ema if teacher == "ema" else {}):
        yield


@dataclass
class Rollouts:
    """A step's rollouts, declared once: sampled (1), judged (2), distilled (3-5), logged (7), and
    gathered across processes under torchrun. Every field holds one entry per rollout."""
    records: list  # each rollout's data record (question, answer, solution, id): G per question
    prompt_ids: list  # the student's prompt x, token ids
    responses: list  # ŷ, token ids through EOS
    truncated: list  # ŷ was cut at max_new_tokens
    texts: list  # ŷ decoded
    rewards: torch.Tensor  # (n,) r(ŷ): 1 if the answer is right
    critiques: list = None  # the critic's critique of ŷ (a str, or critic.Failure); None when not judged
    verdicts: list = None  # "ok", or why the rollout is dropped from the loss (critic.validate_critique)
    contexts: list = None  # the teacher's context c: the arm's form of the critique, or the reference


def sample_rollouts(cfg, model, tokenizer, batch, step, rank, exact):
    """1. G responses per question from the student, which sees the question only, and their reward;
    the step's seed (a resumed run samples the same; under torchrun each chunk of rollouts by its
    place in the step)."""
    records = [r for r in batch for _ in range(cfg.samples_per_question)]
    prompt_ids = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
                  for r in records]
    responses, truncated = sampler.generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                                            cfg.top_p, cfg.top_k, cfg.generation_batch,
                                            seed=common.step_seed(cfg, step), first=rank * len(prompt_ids))
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    rewards = torch.tensor([critic.reward(t, r["answer"], exact) for t, r in zip(texts, records)])
    return Rollouts(records, prompt_ids, responses, truncated, texts, rewards)


def judge_rollouts(cfg, judge, rollouts, analyse):
    """2. The teacher's context c for each rollout: the arm's form of its critique, or the reference
    (the record's solution; under the toy world's alignment dial the dial's, world.load_records).
    Sets rollouts.critiques, .verdicts ("ok" or why the rollout is dropped: critic.validate_critique
    at `critique_validation`) and .contexts. Returns True when a signal abandoned the HTTP critic's
    requests (no critique came back)."""
    n, is_critique, stopped = len(rollouts.records), cfg.arm.startswith("critique"), False
    rollouts.critiques, rollouts.verdicts, rollouts.contexts = [None] * n, ["ok"] * n, [None] * n
    if is_critique or analyse:
        try:
            rollouts.critiques = judge([r["question"] for r in rollouts.records], rollouts.texts,
                                       [r.get("solution", "") for r in rollouts.records],
                                       [r["answer"] for r in rollouts.records])
        except critic.Stopped:
            stopped = True
    if is_critique:  # the arm's form of each valid critique (the two controls rewrite it)
        restyle = world.toy_restyle(cfg)
        rollouts.verdicts = [critic.verdict(t, c, r["answer"], cfg.critique_validation)
                             for t, c, r in zip(rollouts.texts, rollouts.critiques, rollouts.records)]
        rollouts.contexts = [contexts.critique_form(cfg.arm, t, c, restyle) if v == "ok" else c or None
                             for t, c, v in zip(rollouts.texts, rollouts.critiques, rollouts.verdicts)]
    elif cfg.arm == "reference":
        rollouts.contexts = [r["solution"] for r in rollouts.records]
    return stopped


@dataclass
class Kept:
    """What of a step's rollouts enters the loss, and what the loss divides by (kept_rollouts)."""
    index: list  # the kept rollouts: GRPO's with A_i ≠ 0 (all with β > 0), SD's with a valid context
    divisor: int  # the whole step's count, all processes: GRPO's grpo_norm divisor, SD's kept sequences
    zero_signal: float  # the share of the step without signal: GRPO's flat groups, SD's dropped rollouts
    advantages: torch.Tensor = None  # GRPO: A_i per rollout (n,); None for SD
    teacher_ids: dict = None  # SD: {i: the teacher's prompt ids, x with its context c}
    span_ends: dict = None  # SD: {i: where the distilled span ends; None = the whole response}


def kept_rollouts(cfg, tokenizer, rollouts):
    """The rollouts that enter the loss, the loss's divisor (summed over processes under torchrun:
    GRPO's kept tokens, or sequences, by grpo_norm (grpo.policy_gradient_loss); self-distillation's
    kept sequences) and, for self-distillation, the kept rollouts' teacher prompts."""
    responses = rollouts.responses
    if cfg.arm == "grpo":
        advantages, flat_groups = grpo_advantages(rollouts.rewards.view(-1, cfg.samples_per_question))
        advantages = advantages.view(-1)  # A_i = 0: no signal, dropped, unless β·KL acts on it
        keep = [i for i in range(len(responses)) if advantages[i] != 0 or cfg.grpo_beta]
        n_tokens, n_sequences, flat_groups = ranks.all_sum([sum(len(responses[i]) for i in keep), len(keep),
                                                            flat_groups])
        constant = cfg.max_new_tokens * cfg.batch_size * cfg.samples_per_question if n_tokens else 0
        divisor = {"token_mean": n_tokens, "sequence_mean": n_sequences, "constant": constant}[cfg.grpo_norm]
        return Kept(keep, divisor, flat_groups / cfg.batch_size, advantages)
    keep = [i for i in range(len(responses)) if rollouts.verdicts[i] == "ok"]
    [n_sequences] = ranks.all_sum([len(keep)])
    teacher_ids = {i: contexts.teacher_prompt_ids(tokenizer, rollouts.records[i]["question"], rollouts.contexts[i],
                                                  cfg.arm, cfg.prompts, cfg.teacher_thinking, cfg.max_context_tokens)
                   for i in keep}
    span_ends = {i: None if cfg.distill_span == "all" else
                 contexts.span_end(tokenizer, rollouts.responses[i], rollouts.critiques[i]) for i in keep}
    return Kept(keep, n_sequences, 1 - n_sequences / (cfg.batch_size * cfg.samples_per_question), None,
                teacher_ids, span_ends)


def micro_batch_loss(cfg, model, tokenizer, rollouts, kept, part, timer, ema=None, analyse=False):
    """3-5 on the kept rollouts `part`: the loss (the caller runs its backward) and its stats. Each
    micro-batch is divided by the whole step's `kept.divisor` (GRPO: tokens, SD: sequences), so the
    summed gradients are the step's. ema: the EMA teacher's ΔW (teacher=ema). With `analyse`,
    stats["advantage"] holds each rollout's A_t (a tensor per rollout)."""
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d) the frozen LM head
    device, pad_id, divisor = weight.device, tokenizer.pad_token_id, kept.divisor
    student_ids, ys = [rollouts.prompt_ids[i] for i in part], [rollouts.responses[i] for i in part]
    if cfg.arm == "grpo":  # −A_i · log π_θ(ŷ_t) over the kept samples' tokens
        rows = contexts.build_rows(student_ids, ys, pad_id)
    else:  # [student prompt ‖ ŷ] and [teacher prompt(c) ‖ ŷ]: the same ŷ ids (asserted)
        rows, teacher_rows = contexts.build_pair(student_ids, [kept.teacher_ids[i] for i in part], ys, pad_id)
    mask = rows["response_mask"].to(device)  # (B, T): ŷ's tokens, right-aligned
    T = mask.shape[1]
    sampled_ids = rows["input_ids"][:, -T:].to(device)[mask]  # (N,) the tokens ŷ_t
    if cfg.arm == "grpo":
        reference_h = None  # π_ref(·|x, ŷ<t) for β·KL: the base, adapter off, no gradient
        if cfg.grpo_beta:
            with timer("reference"), torch.no_grad(), common.eval_mode(model), model.disable_adapter():
                reference_h = chunked_head.response_hidden(model, rows, T, device)[mask]  # (N, d)
        with timer("student"):
            student_h = chunked_head.response_hidden(model, rows, T, device)[mask]  # (N, d)
            return grpo_loss(student_h, weight, sampled_ids, kept.advantages[part].to(device), mask, divisor, cfg,
                             reference_h)
    # 3. teacher π_T(·|x, c, ŷ<t): no gradient, the adapter switched off (teacher=base)
    with timer("teacher"), torch.no_grad(), common.eval_mode(model), teacher_weights(model, cfg.teacher, ema or {}):
        teacher_h = chunked_head.response_hidden(model, teacher_rows, T, device)[mask]  # (N, d)
    # 4. student π_θ(·|x, ŷ<t): the question only, LoRA on, with gradient; 5. the loss
    with timer("student"):
        student_h = chunked_head.response_hidden(model, rows, T, device)[mask]  # (N, d)
        span = contexts.distilled_span(mask, [kept.span_ends[i] for i in part])  # ⊆ mask
        loss, stats = sd_loss(student_h, teacher_h, weight, sampled_ids, mask, span, n_sequences=divisor,
                              cfg=cfg, with_advantage=analyse)
    if analyse:
        stats["advantage"] = list(stats["advantage"].cpu().split(mask.sum(-1).tolist()))
    return loss, stats


@dataclass
class Trainer:
    """What the loop updates and checkpoints, in one bundle for the update and the checkpoint."""
    run_dir: str
    rank: int
    model: object  # the peft model: the base with its LoRA adapter
    tokenizer: object
    params: list  # the LoRA weights, the only trainable ones
    optimizer: object
    scheduler: object
    state: dict  # resumed: step, ema (the EMA teacher's ΔW), nonfinite (non-finite steps in a row)
    stop: dict  # signal: set by SIGINT/SIGTERM, checked after each step


def optimizer_step(cfg, trainer, totals, divisor):
    """6. One AdamW step on the LoRA weights, skipped when the loss or the gradient norm is not
    finite (counted in state["nonfinite"]), and the EMA teacher's update after it (teacher=ema).
    Under torchrun the processes' gradients and loss totals are summed first, a stop signal on one
    process stops all, and every process takes the same step. Returns (summed totals, grad_norm,
    finite)."""
    state, stop = trainer.state, trainer.stop
    if divisor:  # the step's loss count, all processes: 0 = no sample entered the loss anywhere
        ranks.sum_gradients(trainer.params)
    *sums, asked = ranks.all_sum([*totals.values(), bool(stop["signal"])])
    totals = dict(zip(totals, sums))
    stop["signal"] = stop["signal"] or (signal.SIGTERM if asked else None)  # one stops, all stop
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, cfg.grad_clip or float("inf")))
    finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
    if finite:
        trainer.optimizer.step()
        if cfg.teacher == "ema":
            ema_teacher.ema_update(state["ema"], trainer.model, cfg.ema_rate)
    state["nonfinite"] = 0 if finite else state["nonfinite"] + 1
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    return totals, grad_norm, finite


def metrics_line(cfg, trainer, step, totals, rollouts, kept, analysed, grad_norm, finite, times):
    """7. The step's metrics line (README, Metrics), all but the whole step's time (`time/step`)."""
    tokenizer, verdicts, lr = trainer.tokenizer, rollouts.verdicts, trainer.scheduler.get_last_lr()[0]
    record = {"step": step, "train/loss": totals["loss"], "train/reward": rollouts.rewards.mean().item(),
              "train/response_len": sum(map(len, rollouts.responses)) / len(rollouts.responses),
              "train/truncated": sum(rollouts.truncated) / len(rollouts.truncated),
              "train/critique_invalid": len(verdicts) - verdicts.count("ok"), "train/zero_signal": kept.zero_signal,
              "train/leak_rate": contexts.leak_rate(rollouts.texts, cfg.prompts),
              "train/context_overlap": contexts.context_overlap(tokenizer, rollouts.responses, rollouts.contexts),
              "train/grad_norm": grad_norm, "train/lr": lr, "train/nonfinite": int(not finite), **times}
    for reason in sorted(set(verdicts) - {"ok"}):  # why critiques were dropped (critic.validate_critique)
        record[f"train/dropped/{reason}"] = verdicts.count(reason)
    if totals["tokens"]:  # absent, not 0, when no token entered the loss
        record["train/entropy"] = totals["entropy"] / totals["tokens"]
        if cfg.arm != "grpo" or cfg.grpo_beta:  # grpo: the k3 KL to π_ref, only when penalised
            record["train/kl"] = totals["divergence"] / totals["tokens"]
    if analysed:
        record.update(contexts.advantage_stats(tokenizer, *map(list, zip(*analysed))))
    return record


def start_run(cfg, device, rank):
    """Everything before the loop that can fail, in the order a mistake should surface (the data and
    the run folder before the model loads): (records, run_dir, lock, judge, model, tokenizer)."""
    with ranks.rank0_first(rank):  # under torchrun, rank 0 builds a missing toy world alone
        model_path, train_path, test_path = world.resolve_paths(cfg)  # "toy" = the built toy world
    records = world.load_records(cfg, train_path, need_solution=cfg.arm == "reference")
    if rank == 0:
        common.check_data_settings(cfg, train_path)  # filtered by prepare.py at these settings?
    if cfg.eval_at_end:
        common.load_jsonl(test_path, normalize=critic.normalize_answer)  # a typo must not cost the whole run
    lock = runfolder.RunLock(runfolder.run_folder(cfg), "training") if rank == 0 else None  # one writer
    run_dir = runfolder.prepare_run_dir(cfg, train_path, model_path, OPERATIONAL) if rank == 0 \
        else runfolder.run_folder(cfg)
    judged = cfg.arm.startswith("critique") or cfg.analysis_every
    judge = world.make_judge(cfg, device, records) if judged else None  # frozen
    model, tokenizer = common.load_model(cfg, model_path, device)
    common.check_fits(model, tokenizer, cfg, records)  # the context window; topk below the vocabulary
    if cfg.arm == "reference" and rank == 0:
        common.check_reference_lengths(tokenizer, records, cfg.max_context_tokens)
    return records, run_dir, lock, judge, model, tokenizer


# ---------------------------------------------------------------------------------------------
# The loop: sample → judge → teacher → student → loss → step → log → checkpoint.


def train(cfg):
    device = common.pick_device(cfg)
    rank, world_size = ranks.init_ranks(device)  # (0, 1) alone; under torchrun this process's place
    records, run_dir, lock, judge, model, tokenizer = start_run(cfg, device, rank)
    params, optimizer, scheduler, total_steps = common.optimizer_for(cfg, model, len(records))
    with ranks.rank0_first(rank):  # rank 0 moves damaged checkpoints aside and trims the logs
        state = runfolder.resume(run_dir, model, optimizer, scheduler, writer=rank == 0)
    trainer = Trainer(run_dir, rank, model, tokenizer, params, optimizer, scheduler, state, common.handle_signals())
    tracker = tracking.start(cfg, run_dir, state["step"], rank)  # report_to: the same records, elsewhere too
    model.train()  # LoRA dropout on in the student's forward; generation and the teacher: eval mode
    exact = world.exact_answers(cfg)  # the toy world's integers exactly, decided once
    for step in tqdm(range(state["step"], total_steps), initial=state["step"], total=total_steps,
                     desc=cfg.run, disable=rank > 0 or not common.progress_bars()):
        timer, step_start = common.Timer(device), time.perf_counter()
        torch.manual_seed(common.step_seed(cfg, step))  # per step: a resumed run samples the same
        order = common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)
        batch = ranks.share([records[i] for i in order], rank, world_size)  # this process's share
        # 1. sample ŷ ~ π_θ(· | x), G per question: the student sees the question only
        with timer("generate"):
            rollouts = sample_rollouts(cfg, model, tokenizer, batch, step, rank, exact)
        # 2. judge: the teacher's context c for each rollout (an invalid critique drops its rollout)
        analyse = cfg.arm != "grpo" and cfg.analysis_every and (step + 1) % cfg.analysis_every == 0
        with timer("critic"):
            stopped = judge_rollouts(cfg, judge, rollouts, analyse)
        if stopped and world_size == 1:  # the step never happened: save the last one, stop
            runfolder.drop_step_and_stop(trainer, step)
        # 3-5. teacher (no_grad, adapter off) and student on the same ŷ, the loss per micro-batch,
        # its gradient accumulated (micro_batch_loss); the divisor is the whole step's
        kept = kept_rollouts(cfg, tokenizer, rollouts)
        totals, analysed = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0, "tokens": 0}, []
        for start in range(0, len(kept.index), cfg.micro_batch):
            part = kept.index[start:start + cfg.micro_batch]
            loss, stats = micro_batch_loss(cfg, model, tokenizer, rollouts, kept, part, timer, state["ema"], analyse)
            with timer("student"):
                loss.backward()
            for key in totals:  # SD: D(π_T‖π_θ); GRPO: k3 KL(π_θ‖π_ref) (β > 0)
                totals[key] += loss.item() if key == "loss" else stats[key]
            if analyse:  # A_t of each kept rollout, with its tokens, text and critique
                analysed += [(rollouts.responses[i], A, rollouts.texts[i], rollouts.critiques[i])
                             for i, A in zip(part, stats["advantage"])]
        # 6. update the LoRA weights (a non-finite loss or gradient skips the update)
        with timer("optimizer"):
            totals, grad_norm, finite = optimizer_step(cfg, trainer, totals, kept.divisor)
        # 7. log (under torchrun, every process's rollouts in rank order; rank 0 writes)
        rollouts, analysed = ranks.gather_rollouts(world_size, rollouts, analysed)
        record = metrics_line(cfg, trainer, step + 1, totals, rollouts, kept, analysed, grad_norm, finite,
                              timer.record())
        record["time/step"] = round(time.perf_counter() - step_start, 3)  # all of it up to here
        if rank == 0:
            runfolder.log_step(run_dir, record, total_steps, finite, cfg.sample_every, rollouts)
            tracker.log(record)
        # 8. checkpoint (and stop, on a signal or too many non-finite steps)
        runfolder.checkpoint_and_stop(cfg, trainer, step + 1, total_steps, finite)
    common.default_signals()
    tracker.finish()
    if lock:
        lock.release()
    return run_dir, model


# ---------------------------------------------------------------------------------------------
# The config's rules, and the command line.


ARMS = ("grpo", "reference", "critique", "critique_quoting", "critique_no_prefix")
CHOICES = {
    "arm": ARMS, "context": ARMS, "dtype": ("float32", "bfloat16", "float16"),
    "prompts": ("auto", *contexts.PROMPTS), "toy_order": ("grouped", "chain"),
    "toy_phrasing": ("other", "same"), "teacher": ("base", "ema", "live"),
    "divergence": ("forward", "reverse", "jsd"), "support": ("full", "topk", "sampled"),
    "topk_side": ("student", "teacher"), "schedule": ("constant", "linear", "cosine"),
    "critic": ("rule", "hf", "http"), "critique_validation": critic.VALIDATION,
    "distill_span": ("all", "through_first_divergence"), "grpo_norm": NORMS,
    "report_to": ("none", "tensorboard", "wandb"),
}
# One key's own range, in interval notation (options.check_numbers; every number is also finite and
# every integer in 0..INT_LIMIT). Rules between keys are check_consistency's. The upper bounds catch
# slips that would end in an allocator error or a hang rather than a run.
RANGES = {
    "threads": "[0, 1024]",                # 0 = torch's default
    "lora_r": "[1, 4096]",                 # the paper's 64; ranks beyond a model's width add nothing
    "lora_alpha": "[1, inf)",              # the update is scaled by lora_alpha / lora_r: 0 never learns
    "lora_dropout": "[0, 1)",
    "samples_per_question": "[1, 1024]",   # after resolve (0 = 8 for grpo, 1 otherwise)
    "max_new_tokens": "[1, 1048576]",      # after resolve (0 = the world's budget, or 512)
    "temperature": "[0.001, inf)",         # below 1e-3 greedy in all but name, as eval.MIN_TEMPERATURE
    "logit_temperature": "[0.001, inf)",
    "top_p": "(0, 1]", "top_k": "[0, inf)",
    "generation_batch": "[1, inf)", "batch_size": "[1, inf)", "micro_batch": "[1, inf)",
    "ema_rate": "(0, 1]", "jsd_alpha": "[0, 1]",
    "grpo_beta": "[0, inf)", "token_clip": "[0, inf)", "chunk_size": "[0, inf)",
    "epochs": "[0, inf)", "max_steps": "[0, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)", "grad_clip": "[0, inf)",
    "critic_max_new_tokens": "[1, 1048576]", "critic_batch": "[1, 4096]",  # the critic's budget, critiques at once
    "checkpoint_every": "[1, inf)", "eval_samples": "[1, inf)",
}


def check_consistency(cfg):
    """Settings that are out of range (RANGES), or each valid but contradicting one another. Every
    number finite and in its range (options.check_numbers), the run name a plain folder name
    (runfolder.check_run_name) and the critic's own settings sane (critic.check_settings) first."""
    options.check_numbers(cfg, RANGES)
    runfolder.check_run_name(cfg.run)
    critic.check_settings(cfg)
    if cfg.max_steps == 0 and not cfg.epochs > 0:
        raise UserError("config key 'epochs' must be positive (or set max_steps)")
    if cfg.support == "topk" and cfg.topk < 1:
        raise UserError("config key 'topk' must be at least 1 with support=topk")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise UserError(f"config key 'device' must be auto, cpu, mps, cuda or cuda:N, got '{cfg.device}'")
    G = cfg.samples_per_question
    if cfg.arm == "grpo" and G < 2:
        raise UserError("grpo needs samples_per_question >= 2 (the advantage is relative to the group)")
    if cfg.batch_size % ranks.world_size():
        raise UserError(f"batch_size = {cfg.batch_size} does not divide across {ranks.world_size()} processes "
                        f"(torchrun --nproc_per_node); use a multiple of {ranks.world_size()}")
    if (cfg.batch_size * G) % min(cfg.micro_batch, cfg.batch_size * G):
        raise UserError(f"batch_size·samples_per_question = {cfg.batch_size * G} is not divisible "
                        f"by micro_batch = {cfg.micro_batch}")
    if cfg.distill_span != "all" and not cfg.arm.startswith("critique"):
        raise UserError("distill_span=through_first_divergence needs a critique arm (the span ends "
                        "where the response leaves the critique's verbatim prefix)")
    if cfg.critique_validation == "off" and (cfg.arm in ("critique_quoting", "critique_no_prefix")
                                             or cfg.distill_span != "all"):
        raise UserError(f"{cfg.arm if cfg.arm != 'critique' else 'distill_span=' + cfg.distill_span} reads "
                        f"the critique's steps: it needs critique_validation=full or format, not off")
    if cfg.support == "sampled" and cfg.divergence != "reverse":
        raise UserError("support=sampled estimates reverse KL only; set divergence=reverse")
    if cfg.arm.startswith("critique"):  # the arms that call the critic at every step
        critic.check_reachable(cfg)


def check_arm(cfg):
    """A setting that does nothing for the chosen arm is refused with the reason, when a run starts
    (and for --explain); a program that reads a finished run does not re-judge what it trained with."""
    if cfg.arm != "grpo" and (cfg.grpo_beta, cfg.grpo_norm) != (0.0, "token_mean"):
        key = "grpo_beta" if cfg.grpo_beta else "grpo_norm"
        raise UserError(f"config key '{key}' shapes GRPO's policy-gradient loss, which the {cfg.arm} arm "
                        f"does not use (it distils from a teacher); leave it at its default or use --context grpo")


def resolve(cfg):
    """The derived values, computed once: G, the run name, and what the model decides (the prompt
    set and the length budget: world.model_settings)."""
    world.model_settings(cfg)
    if cfg.samples_per_question == 0:
        cfg.samples_per_question = 8 if cfg.arm == "grpo" else 1
    if not cfg.run:
        cfg.run = f"{cfg.arm}-s{cfg.seed}"
    check_consistency(cfg)
    return cfg


def parse_args(argv):
    """--config FILE.yaml, then --context/--run, then key=value overrides; all checked. Returns
    (cfg, N of --explain N, 0 without it)."""
    values = options.parse_command_line(Config, CHOICES, argv, "Self-distillation with designed feedback.")
    explain = values.pop("explain", 0)
    if "context" in values:  # --context names the arm, as the paper names each by its context
        values["arm"] = values.pop("context")
    cfg = resolve(Config(**values))
    check_arm(cfg)
    if not explain:  # training logs; --explain writes nothing (and programs that only read runs never log)
        tracking.check_ready(cfg)
    return cfg, explain


def load_config(argv):
    return parse_args(argv)[0]


def main(argv=None):
    with common.user_errors():
        cfg, explain = parse_args(sys.argv[1:] if argv is None else argv)
        if explain:  # one step shown is its own program now, with the same arguments
            raise UserError(f"--explain is its own program: python explain.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        run_dir, model = train(cfg)
        if not cfg.eval_at_end:
            ranks.leave_group()  # under torchrun: a group left standing can abort the interpreter at exit
            return
        del model  # eval.py in its own process: it imports this file, never the reverse
        sys.exit(common.evaluate_in_child(run_dir, cfg.trust_remote_code))  # it sends its rows to report_to


if __name__ == "__main__":
    main()
