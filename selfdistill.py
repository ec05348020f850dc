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
 4. GRPO: one on-policy update per batch (ratio 1, no clip), no KL penalty, std with Bessel's
    correction. Samples with A_i = 0 (a group whose rewards are all equal) carry no signal and are
    dropped; the loss is the token mean over the kept samples' tokens of the whole batch.
 5. A critique that fails validation (critic.validate_critique) drops its sample from the loss,
    counted in `train/critique_invalid`; it is never replaced by anything else.
 6. A teacher context longer than `max_context_tokens` loses its middle (marked); the question
    and the final instruction are never cut.
 7. The student's chat template runs with thinking off; the teacher's with `teacher_thinking`
    (the paper follows OPSD: on; our default off, since the toy template has no switch).
 8. The prompts are in our own words (contexts.PROMPTS); the paper's were not released.
 9. A step whose loss or gradient norm is not finite skips its update; `max_nonfinite` such
    steps in a row stop the run (after a checkpoint).
10. The reward compares the text after `<answer>` (else the last \\boxed{}) with the gold answer
    through critic.answers_match: math-verify, or an exact integer check in the toy world (the
    paper does not say what it used).
11. `distill_span=through_first_divergence` (ours, an ablation): only the response tokens up to
    and including the first one that leaves the critique's verbatim prefix are distilled, still
    divided by the full response length |ŷ|.
12. With no --config the run is the toy world (toy.py): a 1 M-parameter model on arithmetic
    chains, CPU, minutes. The paper setting is configs/qwen3-1.7b.yaml.
13. `analysis_every` logs the per-token advantage A_t = log π_T(ŷ_t) − log π_θ(ŷ_t) of the arm's
    own teacher on the step's wrong rollouts, from the forward passes the loss already made.

Commands:
    python selfdistill.py --context critique                      # toy world, end to end, CPU
    python selfdistill.py --context grpo --config configs/smoke.yaml
    python selfdistill.py --context reference lr=1e-3 epochs=3    # key=value overrides
    python selfdistill.py --help                                  # every config field
    torchrun --nproc_per_node=4 selfdistill.py --context critique run=NAME   # data-parallel
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import contexts
import critic
import toy
from common import UserError

# peft calls a transformers method that transformers 5 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


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
    critic_max_new_tokens: int = 1024  # critique length limit
    # logging, checkpoints, evaluation
    sample_every: int = 10  # write samples.jsonl (with the teacher contexts) every N steps
    checkpoint_every: int = 10  # checkpoint every N steps (and at the end)
    analysis_every: int = 0  # log per-token advantage statistics every N steps (0 = off)
    eval_at_end: bool = True  # evaluate every checkpoint on the test set when training ends
    eval_samples: int = 12  # samples per test question for eval (Avg@k, Pass@k, Maj@k)
    eval_questions: int = 0  # test questions to evaluate (0 = all)


ARMS = ("grpo", "reference", "critique", "critique_quoting", "critique_no_prefix")
CHOICES = {
    "arm": ARMS, "context": ARMS, "dtype": ("float32", "bfloat16", "float16"),
    "prompts": ("auto", *contexts.PROMPTS), "toy_order": ("grouped", "chain"),
    "toy_phrasing": ("other", "same"), "teacher": ("base", "ema", "live"),
    "divergence": ("forward", "reverse", "jsd"), "support": ("full", "topk", "sampled"),
    "topk_side": ("student", "teacher"), "schedule": ("constant", "linear", "cosine"),
    "critic": ("rule", "hf", "http"), "distill_span": ("all", "through_first_divergence"),
}


def resolve(cfg):
    """The derived values, computed once: G, the run name, the prompt set and the length budget."""
    toy_model = toy.is_world_model(cfg.model)
    if cfg.prompts == "auto":
        cfg.prompts = "toy" if toy_model else "instruct"
    elif cfg.prompts == "toy" and not toy_model:  # a chat model would see a bare question
        raise UserError(f"prompts=toy is the toy world's prompt set (the question alone, no instruction); "
                        f"model={cfg.model} is not a toy-world model: leave prompts at auto (instruct)")
    if cfg.samples_per_question == 0:
        cfg.samples_per_question = 8 if cfg.arm == "grpo" else 1
    if not cfg.run:
        cfg.run = f"{cfg.arm}-s{cfg.seed}"
    if toy_model:  # model=toy, or a built world's model folder: that world's build.json
        budget = toy.budget(toy.world_root(cfg.model))
        if cfg.max_new_tokens == 0:
            cfg.max_new_tokens = budget
        elif cfg.max_new_tokens != budget:
            print(f"warning: max_new_tokens={cfg.max_new_tokens} differs from the toy world's budget "
                  f"{budget} (build.json), which its difficulty filter used", file=sys.stderr)
    elif cfg.max_new_tokens == 0:
        cfg.max_new_tokens = 512
    if not toy_model and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other"):
        raise UserError("config keys 'toy_order' and 'toy_phrasing' apply to toy-world models only")
    common.check_consistency(cfg)
    return cfg


def load_config(argv):
    """--config FILE.yaml, then --context/--run, then key=value overrides; all checked."""
    values = common.parse_command_line(Config, CHOICES, argv, "Self-distillation with designed feedback.")
    if "context" in values:  # --context names the arm, as the paper names each by its context
        values["arm"] = values.pop("context")
    return resolve(Config(**values))


# ---------------------------------------------------------------------------------------------
# Divergences and the GRPO loss: pure functions of logits. Student first, teacher second; the
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


def grpo_advantages(rewards, eps=1e-6):
    """A_i = (r_i − mean(r)) / (std(r) + ε) within each group. rewards (Q, G) → (Q, G), #flat groups."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # Bessel-corrected, as in TRL's GRPO
    zero_variance = int((std.squeeze(-1) == 0).sum())
    return (rewards - mean) / (std + eps), zero_variance


def policy_gradient_loss(logp, advantages, mask, n_tokens):
    """−A_i·log π_θ(ŷ_t), summed over this micro-batch's tokens, divided by the step's token count
    (token mean over the whole effective batch). logp (B, T), advantages (B,), mask (B, T)."""
    return -(advantages[:, None] * logp * mask).sum() / n_tokens


# ---------------------------------------------------------------------------------------------
# From hidden states to per-token values without a (T, V) tensor. The LM head and the per-token
# function run over chunks of positions, and each chunk's gradient w.r.t. the hidden states is
# taken right there (one extra matmul), so nothing of size V outlives its chunk and nothing is
# recomputed in the backward pass.

CHUNK_LOGITS_MB = 112  # chunk_size=0: one chunk's (C, V) float32 logits take at most this many MiB


def chunk_positions(chunk_size, vocab_size):
    """Positions per chunk: chunk_size, or for 0 the most whose (C, V) float32 logits fit in
    CHUNK_LOGITS_MB. A chunk holds about eight tensors of that size at once: at Qwen3's V = 151,936,
    193 positions and ≈ 0.9 GB; at the toy's V = 111, a whole micro-batch in one chunk. The LM head's
    matmuls run faster on more rows (README, Performance)."""
    return chunk_size or max(1, int(CHUNK_LOGITS_MB * 2 ** 20 // (4 * vocab_size)))


class ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, per_token_fn, chunk_size):
        # hidden (N, d): the student's hidden states at response positions; weight (V, d): LM head.
        # per_token_fn(logits (C, V), positions slice) -> (C,) values, differentiable in logits.
        N = hidden.shape[0]
        values = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        weight = weight.detach()
        C = chunk_positions(chunk_size, weight.shape[0])
        for i in range(0, N, C):
            positions = slice(i, min(i + C, N))
            with torch.enable_grad():
                logits = (hidden[positions].detach() @ weight.T).requires_grad_(grad_hidden is not None)
                chunk_values = per_token_fn(logits, positions)  # (C,)
                if grad_hidden is not None:
                    (grad_logits,) = torch.autograd.grad(chunk_values.sum(), logits)  # (C, V)
                    grad_hidden[positions] = grad_logits.to(weight.dtype) @ weight  # (C, d)
                    del grad_logits  # freed now, not while the next chunk's divergence peaks
            values[positions] = chunk_values.detach().float()
        ctx.save_for_backward(grad_hidden)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        # Each value depends only on its own position, so the upstream gradient is a per-row scale.
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_values[:, None].to(grad_hidden.dtype), None, None, None


def sd_loss(student_h, teacher_h, weight, sampled_ids, mask, span, n_sequences, cfg, with_advantage=False):
    """L_SD on one micro-batch: 1/|ŷ| Σ_{t in span} D(π_T ‖ π_θ)(t), summed over its sequences and
    divided by the step's sequence count. student_h, teacher_h (N, d) at the response positions
    (mask (B, T) True); span (B, T) ⊆ mask: the distilled tokens. Returns (loss, per-token stats)."""
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
        return token_divergence(student_logits, teacher_logits, cfg.divergence, cfg.support, cfg.topk,
                                cfg.topk_side, cfg.topk_tail, cfg.jsd_alpha, sampled_ids[positions],
                                cfg.token_clip, cfg.logit_temperature)

    values = ChunkedHead.apply(student_h, weight, per_token, cfg.chunk_size)  # (N,) D(t)
    grid = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, values)  # (B, T)
    # 1/|ŷ| Σ_t over the distilled tokens: the divisor is the full response length
    loss = ((grid * span).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    keep = span[mask]  # (N,)
    return loss, {"divergence": (values * keep).sum().item(), "entropy": (entropy * keep).sum().item(),
                  "tokens": int(keep.sum()), "advantage": advantage}


def grpo_loss(student_h, weight, sampled_ids, advantages, mask, n_tokens, cfg):
    """−A_i·log π_θ(ŷ_t) on one micro-batch, divided by the step's kept-token count."""
    entropy = torch.zeros(student_h.shape[0], device=student_h.device)

    def per_token(student_logits, positions):  # log π_θ(ŷ_t | x, ŷ<t): (C, V) → (C,)
        logp = (student_logits.float() / cfg.logit_temperature).log_softmax(-1)
        with torch.no_grad():
            entropy[positions] = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, sampled_ids[positions, None]).squeeze(-1)

    logp = ChunkedHead.apply(student_h, weight, per_token, cfg.chunk_size)  # (N,)
    grid = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, logp)  # (B, T)
    loss = policy_gradient_loss(grid, advantages, mask, n_tokens)
    return loss, {"entropy": entropy.sum().item(), "tokens": logp.numel()}


# ---------------------------------------------------------------------------------------------
# Teachers and what they see.

def lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "get_delta_weight")
            and "default" in getattr(m, "lora_A", {})]


@torch.no_grad()
def ema_update(ema, model, rate):
    """ΔW_T ← (1 − rate)·ΔW_T + rate·ΔW_θ for every adapted matrix (an EMA of s·BA, not of A, B)."""
    for name, module in lora_modules(model):
        delta = module.get_delta_weight("default").float()
        if name not in ema:
            ema[name] = torch.zeros_like(delta)
        ema[name].mul_(1 - rate).add_(delta, alpha=rate)


@contextlib.contextmanager
def teacher_weights(model, teacher, ema):
    """base: the adapter switched off (the initial model); ema: off, plus x·ΔW_Tᵀ added to each
    adapted layer's output; live: the current weights as they are."""
    if teacher == "live":
        yield
        return
    hooks = []
    with model.disable_adapter():
        for name, module in lora_modules(model) if teacher == "ema" else []:
            if name in ema:
                def hook(layer, args, output, delta=ema[name]):
                    return output + F.linear(args[0].to(delta.dtype), delta).to(output.dtype)
                hooks.append(module.base_layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def toy_dial(cfg):
    """True when the toy world's references are rebuilt with non-default alignment knobs."""
    return toy.is_world_model(cfg.model) and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other")


def teacher_context(cfg, record):
    """The reference solution the teacher sees in the `reference` arm."""
    if toy_dial(cfg):  # the alignment dial: a reference that follows the chain and/or its phrasing
        return toy.reference_solution(record["question"], cfg.toy_order, cfg.toy_phrasing)
    return record["solution"]


def exact_answers(cfg):
    """The toy world's answers are integers, checked exactly; any other model's go to math-verify."""
    return toy.is_world_model(cfg.model)


def make_judge(cfg, device):
    """The frozen critic: the toy world's rule critic, or a model critic (critic.py)."""
    return toy.RuleCritic() if cfg.critic == "rule" else critic.from_config(cfg, device)


def toy_restyle(cfg):
    """The no-prefix critique control's rewrite of a step: on toy chains (the rule critic reads
    nothing else), the reference-only wording; a model critic's steps are kept as written."""
    return toy.restyle_step if cfg.critic == "rule" else None


def drop_step_and_stop(run_dir, step, model, optimizer, scheduler, ema, state, stop, tokenizer):
    """A stop signal came while the HTTP critic was waiting: nothing of this step is applied yet, so
    the checkpoint of the `step` finished steps is written (if not already) and we stop; a resume
    repeats this step in full, as if never begun."""
    if step == 0:
        print(f"stopped by signal {stop['signal']} during the first step; nothing to save yet")
        sys.exit(128 + stop["signal"])
    common.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                           {"step": step, "ema": ema, "nonfinite": state["nonfinite"]}, tokenizer)
    common.stop_if_asked(stop, False, state["nonfinite"], step)


# ---------------------------------------------------------------------------------------------
# The loop: sample → judge → teacher → student → loss → step → log → checkpoint.

def train(cfg):
    from tqdm import tqdm
    device = common.pick_device(cfg)
    rank, world = common.init_ranks(device)  # (0, 1) alone; under torchrun this process's place
    with common.rank0_first(rank):  # under torchrun, rank 0 builds a missing toy world alone
        model_path, train_path, test_path = toy.resolve_paths(cfg)  # "toy" = the built toy world
    records = common.load_jsonl(train_path, cfg.arm == "reference" and not toy_dial(cfg), critic.normalize_answer)
    if cfg.eval_at_end:
        common.load_jsonl(test_path, normalize=critic.normalize_answer)  # a typo must not cost the whole run
    lock = common.RunLock(common.run_folder(cfg), "training") if rank == 0 else None  # one writer per run
    run_dir = common.prepare_run_dir(cfg) if rank == 0 else common.run_folder(cfg)
    if rank == 0:
        print(f"config ({os.path.join(run_dir, 'config.yaml')}): "
              + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    is_critique = cfg.arm.startswith("critique")
    if cfg.critic == "rule" and (is_critique or cfg.analysis_every):
        toy.check_rule_critic(records)  # the rule critic reads toy chains only
    judge = make_judge(cfg, device) if is_critique or cfg.analysis_every else None  # frozen
    model, tokenizer = common.load_model(cfg, model_path, device)
    common.check_fits(model, tokenizer, cfg, records)
    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA factors only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(records) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(cfg, total_steps))
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d) the frozen LM head
    if cfg.support == "topk" and cfg.topk >= weight.shape[0]:
        raise UserError(f"support=topk with topk={cfg.topk} >= the vocabulary size {weight.shape[0]} is "
                        f"support=full; set support=full or a smaller topk")
    with common.rank0_first(rank):  # rank 0 moves damaged checkpoints aside and trims the logs
        state = common.resume(run_dir, model, optimizer, scheduler, writer=rank == 0)  # {"step", "ema", "nonfinite"}
    model.train()  # LoRA dropout on in the student's forward; generation and the teacher use eval mode
    ema, stop, G, pad = state["ema"], common.handle_signals(), cfg.samples_per_question, tokenizer.pad_token_id
    exact = exact_answers(cfg)
    for step in tqdm(range(state["step"], total_steps), initial=state["step"], total=total_steps, desc=cfg.run,
                     disable=rank > 0 or not common.progress_bars()):
        timer, step_start = common.Timer(device), time.perf_counter()
        torch.manual_seed(common.step_seed(cfg, step))  # per step, so a resumed run samples the same
        batch = [records[i] for i in common.batch_for_step(len(records), cfg.batch_size, step, cfg.seed)]
        batch = common.share(batch, rank, world)  # this process's questions (all of them alone)
        per_rollout = [r for r in batch for _ in range(G)]  # the record of each rollout: G per question
        # 1. sample ŷ ~ π_θ(· | x): the student sees the question only
        with timer("generate"):
            prompt_ids = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts, cfg.student_thinking)
                          for r in per_rollout]
            responses, truncated = common.generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                                                   cfg.top_p, cfg.top_k, cfg.generation_batch,
                                                   seed=common.step_seed(cfg, step), first=rank * len(prompt_ids))
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rewards = torch.tensor([critic.reward(t, r["answer"], exact) for t, r in zip(texts, per_rollout)])
        # 2. judge: the teacher's context c for each rollout (an invalid critique drops its rollout)
        analyse = cfg.analysis_every > 0 and (step + 1) % cfg.analysis_every == 0 and cfg.arm != "grpo"
        n = len(per_rollout)
        critiques, valid, context_texts = [None] * n, [True] * n, [None] * n
        with timer("critic"):
            if is_critique or analyse:
                try:
                    critiques = judge([r["question"] for r in per_rollout], texts,
                                      [r.get("solution", "") for r in per_rollout], [r["answer"] for r in per_rollout])
                except critic.Stopped:  # a signal abandoned the HTTP critic's requests
                    if world == 1:  # this step never happened: save the last finished one and stop
                        drop_step_and_stop(run_dir, step, model, optimizer, scheduler, ema, state, stop, tokenizer)
                    critiques = [None] * n  # under torchrun the ranks stop together, after this step
            if is_critique:  # the arm's form of each valid critique (the two controls rewrite it)
                valid = [c is not None and critic.validate_critique(t, c, r["answer"])[0]
                         for t, c, r in zip(texts, critiques, per_rollout)]
                context_texts = [contexts.critique_form(cfg.arm, t, c, toy_restyle(cfg)) if ok else c
                                 for t, c, ok in zip(texts, critiques, valid)]
            elif cfg.arm == "reference":
                context_texts = [teacher_context(cfg, r) for r in per_rollout]
        # 3-5. teacher and student on the same ŷ; the loss's gradient accumulates over micro-batches.
        # The normalisers are the whole step's counts, summed over processes under torchrun.
        totals, keep, A_parts = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0, "tokens": 0}, [], []
        if cfg.arm == "grpo":
            advantages, flat_groups = grpo_advantages(rewards.view(-1, G))
            advantages = advantages.view(-1)
            keep = [i for i in range(n) if advantages[i] != 0]  # A_i = 0: no signal
            n_tokens, flat_groups = common.all_sum([sum(len(responses[i]) for i in keep), flat_groups])
            n_kept, zero_signal = n_tokens, flat_groups / cfg.batch_size  # n_kept: the step's loss count
        else:
            keep = [i for i in range(n) if valid[i]]
            [n_kept] = common.all_sum([len(keep)])  # sequences in the loss, the step's divisor
            zero_signal = 1 - n_kept / (cfg.batch_size * G)
        for start in range(0, len(keep), cfg.micro_batch):
            part = keep[start:start + cfg.micro_batch]
            if cfg.arm == "grpo":  # −A_i · log π_θ(ŷ_t), token mean over the batch's kept samples
                rows = contexts.build_rows([prompt_ids[i] for i in part], [responses[i] for i in part], pad)
            else:  # [student prompt ‖ ŷ] and [teacher prompt(c) ‖ ŷ]: the same ŷ ids (asserted)
                rows, teacher_rows = contexts.build_pair([prompt_ids[i] for i in part], [contexts.teacher_prompt_ids(
                    tokenizer, per_rollout[i]["question"], context_texts[i], cfg.arm, cfg.prompts, cfg.teacher_thinking,
                    cfg.max_context_tokens) for i in part], [responses[i] for i in part], pad)
            mask = rows["response_mask"].to(device)  # (B, T): ŷ's tokens, right-aligned
            sampled_ids = rows["input_ids"][:, -mask.shape[1]:].to(device)[mask]  # (N,) the tokens ŷ_t
            if cfg.arm == "grpo":
                with timer("student"):
                    student_h = common.response_hidden(model, rows, mask.shape[1], device)[mask]  # (N, d)
                    loss, stats = grpo_loss(student_h, weight, sampled_ids, advantages[part].to(device),
                                            mask, n_tokens, cfg)
                    loss.backward()
            else:
                # 3. teacher π_T(·|x, c, ŷ<t): no gradient, the adapter switched off (teacher=base)
                with timer("teacher"), torch.no_grad(), common.eval_mode(model), \
                        teacher_weights(model, cfg.teacher, ema):
                    teacher_h = common.response_hidden(model, teacher_rows, mask.shape[1], device)[mask]
                # 4. student π_θ(·|x, ŷ<t): the question only, LoRA on, with gradient
                with timer("student"):
                    student_h = common.response_hidden(model, rows, mask.shape[1], device)[mask]  # (N, d)
                    span = contexts.distilled_span(mask, [None if cfg.distill_span == "all" else 1 + contexts.departure_index(
                        responses[i], tokenizer(critiques[i], add_special_tokens=False)["input_ids"]) for i in part])
                    loss, stats = sd_loss(student_h, teacher_h, weight, sampled_ids, mask, span, n_kept, cfg,
                                          with_advantage=analyse)
                    loss.backward()
                totals["divergence"] += stats["divergence"]
                if analyse:
                    A_parts.extend(stats["advantage"].cpu().split(mask.sum(-1).tolist()))
            totals["loss"] += loss.item()
            totals["entropy"] += stats["entropy"]
            totals["tokens"] += stats["tokens"]
        # 6. update the LoRA weights (a non-finite loss or gradient skips the update); under torchrun
        # the processes' gradients are summed first, and every process takes the same step
        with timer("optimizer"):
            if n_kept:
                common.sum_gradients(params)
            *sums, asked = common.all_sum([*totals.values(), bool(stop["signal"])])
            totals = dict(zip(totals, sums))
            stop["signal"] = stop["signal"] or (signal.SIGTERM if asked else None)  # one stops, all stop
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                if cfg.teacher == "ema":
                    ema_update(ema, model, cfg.ema_rate)
            state["nonfinite"] = 0 if finite else state["nonfinite"] + 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # 7. log (under torchrun, every process's rollouts in rank order; rank 0 writes)
        analysed = list(zip(*[[responses[i] for i in keep], A_parts, [texts[i] for i in keep],
                              [critiques[i] for i in keep]])) if analyse else []
        if world > 1:
            per_rollout, texts, responses, truncated, context_texts, valid, analysed = (common.gather(x) for x in (
                per_rollout, texts, responses, truncated, context_texts, valid, analysed))
            rewards = torch.tensor(common.gather(rewards.tolist()))
        record = {"step": step + 1, "train/loss": totals["loss"], "train/reward": rewards.mean().item(),
                  "train/response_len": sum(map(len, responses)) / len(responses),
                  "train/truncated": sum(truncated) / len(truncated),
                  "train/critique_invalid": valid.count(False), "train/zero_signal": zero_signal,
                  "train/leak_rate": common.leak_rate(texts, cfg.prompts),
                  "train/context_overlap": common.context_overlap(tokenizer, responses, context_texts),
                  "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                  "train/nonfinite": int(not finite), **timer.record()}
        if totals["tokens"]:  # absent, not 0, when no token entered the loss
            record["train/entropy"] = totals["entropy"] / totals["tokens"]
            if cfg.arm != "grpo":  # no teacher, no divergence in grpo
                record["train/kl"] = totals["divergence"] / totals["tokens"]
        if analysed:
            record.update(contexts.advantage_stats(tokenizer, *map(list, zip(*analysed))))
        record["time/step"] = round(time.perf_counter() - step_start, 3)  # all of it up to this line
        if rank == 0:
            common.log_step(run_dir, record, total_steps, finite, cfg.sample_every, per_rollout, texts, rewards,
                            context_texts, valid, truncated)
        # 8. checkpoint
        give_up = not finite and state["nonfinite"] >= cfg.max_nonfinite
        if rank == 0 and (step + 1 == total_steps or (step + 1) % cfg.checkpoint_every == 0 or stop["signal"]
                          or give_up):
            common.save_checkpoint(run_dir, step + 1, model, optimizer, scheduler,
                                   {"step": step + 1, "ema": ema, "nonfinite": state["nonfinite"]}, tokenizer)
        if stop["signal"] or give_up:
            common.barrier()  # under torchrun the others wait for rank 0's checkpoint before leaving
        common.stop_if_asked(stop, give_up, state["nonfinite"], step + 1)
    common.default_signals()
    if lock:
        lock.release()
    return run_dir, model


def main(argv=None):
    with common.user_errors():
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        run_dir, model = train(cfg)
        if cfg.eval_at_end:  # eval.py in its own process: it imports this file, never the reverse
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            here = os.path.dirname(os.path.abspath(__file__))
            trust = ["--trust-remote-code"] if cfg.trust_remote_code else []  # given on this command line
            env = common.child_group_env()  # under torchrun, eval.py's processes form their own group
            common.leave_group()
            # our SIGINT/SIGTERM are passed on to it, and we wait: it never runs on alone
            sys.exit(common.run_child([sys.executable, os.path.join(here, "eval.py"), run_dir, *trust], env))


if __name__ == "__main__":
    main()
