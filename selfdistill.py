"""selfdistill: self-distillation with designed feedback, after "The Role of Feedback Alignment in
Self-Distillation" (Kara & Ersoy 2026). One model is the student π_θ(·|x) and, with its LoRA
adapter switched off, its own teacher π_T(·|x, c). On the student's own samples ŷ we minimise

    L_SD(θ) = E_x E_ŷ [ 1/|ŷ| Σ_t KL( sg π_T(·|x,c,ŷ<t) ‖ π_θ(·|x,ŷ<t) ) ]        (forward KL)

and compare three contexts c: `grpo` (no teacher: binary reward, group-normalised policy
gradient), `reference` (a reference solution) and `critique` (a step-aligned critique of ŷ from a
frozen critic).

Deviations from the paper and choices it leaves open (each a config field):
 1. The teacher is the base model (LoRA off), as in the paper; `teacher=ema|live` are ablations.
    The EMA is of the adapter *update* ΔW = s·BA, kept dense, so it costs one copy of the adapted
    matrices; it is saved in checkpoints.
 2. Divergences are computed on logits / `logit_temperature` on both sides (default 1.0, i.e. the
    model's own distributions; the paper samples at 1.1 and does not say what the loss uses).
 3. Unknown in the paper, chosen here: constant learning rate, no warm-up, grad clip 1.0, no
    weight decay, no per-token clipping, top-p 1, top-k off. GRPO: one on-policy update per batch
    (ratio 1, no clip), no KL penalty, std with Bessel's correction, token-mean loss.
 4. A critique that fails validation drops its sample from the loss (counted), never replaced.
 5. With no --config the run is the toy world (toy.py): a 1 M-parameter model on arithmetic
    chains, CPU, minutes. The paper setting is configs/qwen3-1.7b.yaml.

Commands:
    python selfdistill.py --context critique                      # toy world, end to end, CPU
    python selfdistill.py --context grpo --config configs/smoke.yaml
    python selfdistill.py --context reference lr=1e-3 epochs=3    # key=value overrides
    python selfdistill.py --help                                  # every config field
"""
import argparse
import contextlib
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml

import contexts
import critic

# peft calls a transformers method that transformers 5 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Config: defaults are the toy world; configs/*.yaml hold overrides only.

@dataclass
class Config:
    context: str = "critique"  # the arm: grpo (no teacher, reward only) | reference | critique | critique_quoting | critique_no_prefix (the paper's two critique-form controls)
    run: str = ""  # run name: runs/NAME; default <context>-s<seed>; rerunning a name resumes it
    out_dir: str = "runs"  # folder that holds the runs
    seed: int = 0  # seeds data order, sampling and LoRA init
    # model
    model: str = "toy"  # local folder or hub id of a causal LM; "toy" builds/loads the toy world's base
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights and activations)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    trust_remote_code: bool = False  # allow model code from the hub folder (off: safer)
    prompts: str = "toy"  # prompt set in contexts.PROMPTS: toy | instruct
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
    samples_per_question: int = 0  # G; 0 = 8 for grpo, 1 for reference/critique (the paper)
    max_new_tokens: int = 0  # response length limit, cut and flagged; 0 = the toy world's budget (build.json) for model=toy, 512 otherwise
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
    distill_span: str = "all"  # all response tokens | through_first_divergence: up to the first token that leaves the critique's verbatim prefix (normalised by the full length)
    logit_temperature: float = 1.0  # both sides' logits are divided by this before the divergence
    chunk_size: int = 128  # response positions per chunk of LM head + divergence (memory knob)
    max_context_tokens: int = 1024  # longer teacher contexts lose their middle (marked)
    # optimisation
    batch_size: int = 32  # questions per optimizer step (paper: 32)
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
    critic_timeout: float = 120.0  # http: seconds per request
    critic_retries: int = 3  # http: retries after a failed request
    critic_max_new_tokens: int = 1024  # critique length limit
    # logging, checkpoints, evaluation
    sample_every: int = 10  # write samples.jsonl (with the teacher contexts) every N steps
    checkpoint_every: int = 10  # checkpoint every N steps (and at the end)
    analysis_every: int = 0  # log per-token advantage statistics every N steps (0 = off)
    eval_at_end: bool = True  # evaluate every checkpoint on the test set when training ends
    eval_samples: int = 12  # samples per test question for eval (Avg@k, Pass@k, Maj@k)
    eval_questions: int = 0  # test questions to evaluate (0 = all)


CHOICES = {
    "context": ("grpo", "reference", "critique", "critique_quoting", "critique_no_prefix"),
    "distill_span": ("all", "through_first_divergence"), "dtype": ("float32", "bfloat16", "float16"),
    "prompts": tuple(contexts.PROMPTS), "toy_order": ("grouped", "chain"),
    "toy_phrasing": ("other", "same"), "teacher": ("base", "ema", "live"),
    "divergence": ("forward", "reverse", "jsd"), "support": ("full", "topk", "sampled"),
    "topk_side": ("student", "teacher"), "schedule": ("constant", "linear", "cosine"),
    "critic": ("rule", "hf", "http"),
}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def field_help():
    """Each field's trailing comment, read from the class source (one source of truth)."""
    out = {}
    for line in inspect.getsource(Config).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and name in FIELDS and "#" in rest:
            out[name] = rest.split("#", 1)[1].strip()
    return out


def coerce(key, value, from_text):
    """Check (and, for command-line text, convert) one value against the field's type."""
    kind = FIELDS[key].type
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(kind, kind)
    if kind is float and isinstance(value, str):
        from_text = True  # YAML reads 1e-3 (no dot) as a string; it is still a number
    if from_text:
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            else:
                value = kind(value)
        except ValueError:
            raise UserError(f"config key '{key}' wants {TYPE_NAMES[kind]}, got '{value}'") from None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' wants {TYPE_NAMES[kind]}, got {value!r} "
                        f"({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"config key '{key}' must be one of {'|'.join(CHOICES[key])}, got '{value}'")
    return value


def check_key(key):
    if key not in FIELDS:
        near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else " (see --help)"
        raise UserError(f"unknown config key '{key}'{hint}")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if keys.count(key) > 1:
                raise UserError(f"config key '{key}' is given twice (line {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def load_config(argv):
    """--config FILE.yaml, then --context/--run, then key=value overrides; all checked."""
    help_text = field_help()
    epilog = "config fields (key=value):\n" + "\n".join(
        f"  {name:<24} {FIELDS[name].default!r:<12} {help_text.get(name, '')}" for name in FIELDS)
    parser = argparse.ArgumentParser(description="Self-distillation with designed feedback.", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", choices=CHOICES["context"], help="what the teacher sees")
    parser.add_argument("--config", help="YAML file of overrides")
    parser.add_argument("--run", help="run name (rerun the same name to resume)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise UserError(f"config file {args.config} not found")
        try:
            with open(args.config) as f:
                loaded = yaml.load(f, Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise UserError(f"config file {args.config} is not valid YAML{line}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {args.config} must be a mapping of key: value")
        for key, value in loaded.items():
            check_key(key)
            values[key] = coerce(key, value, from_text=False)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"expected key=value, got '{item}'")
        check_key(key)
        values[key] = coerce(key, value, from_text=True)
    if args.context:
        values["context"] = args.context
    if args.run:
        values["run"] = args.run
    cfg = Config(**values)
    # --- derived values, computed once
    if cfg.samples_per_question == 0:
        cfg.samples_per_question = 8 if cfg.context == "grpo" else 1
    if not cfg.run:
        cfg.run = f"{cfg.context}-s{cfg.seed}"
    if cfg.model == "toy":
        import toy
        if cfg.max_new_tokens == 0:
            cfg.max_new_tokens = toy.budget()
        elif cfg.max_new_tokens != toy.budget():
            print(f"warning: max_new_tokens={cfg.max_new_tokens} differs from the toy world's budget "
                  f"{toy.budget()} (build.json), which its difficulty filter used", file=sys.stderr)
    elif cfg.max_new_tokens == 0:
        cfg.max_new_tokens = 512
    check_consistency(cfg)
    return cfg


def check_consistency(cfg):
    """Settings that are each valid but contradict one another."""
    for key in ("batch_size", "micro_batch", "max_new_tokens", "chunk_size", "generation_batch",
                "lora_r", "eval_samples", "samples_per_question", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise UserError(f"config key '{key}' must be at least 1")
    for key in ("max_steps", "weight_decay", "grad_clip", "top_k", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise UserError(f"config key '{key}' must be at least 0 (0 = off)")
    if not cfg.lr > 0:
        raise UserError("config key 'lr' must be positive")
    if cfg.max_steps == 0 and not cfg.epochs > 0:
        raise UserError("config key 'epochs' must be positive (or set max_steps)")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError("config key 'lora_dropout' must lie in [0, 1)")
    if not 0 < cfg.top_p <= 1:
        raise UserError("config key 'top_p' must lie in (0, 1] (1 = off)")
    if cfg.support == "topk" and cfg.topk < 1:
        raise UserError("config key 'topk' must be at least 1 with support=topk")
    if cfg.model != "toy" and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other"):
        raise UserError("config keys 'toy_order' and 'toy_phrasing' apply to model=toy only")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise UserError(f"config key 'device' must be auto, cpu, mps, cuda or cuda:N, got '{cfg.device}'")
    G = cfg.samples_per_question
    if cfg.context == "grpo" and G < 2:
        raise UserError("grpo needs samples_per_question >= 2 (the advantage is relative to the group)")
    if (cfg.batch_size * G) % min(cfg.micro_batch, cfg.batch_size * G):
        raise UserError(f"batch_size·samples_per_question = {cfg.batch_size * G} is not divisible "
                        f"by micro_batch = {cfg.micro_batch}")
    if not 0.0 <= cfg.jsd_alpha <= 1.0:
        raise UserError("jsd_alpha must lie in [0, 1]")
    if not 0.0 < cfg.ema_rate <= 1.0:
        raise UserError("ema_rate must lie in (0, 1]")
    if cfg.temperature <= 0 or cfg.logit_temperature <= 0:
        raise UserError("temperature and logit_temperature must be positive")
    if cfg.distill_span != "all" and not cfg.context.startswith("critique"):
        raise UserError("distill_span=through_first_divergence needs a critique arm (the span ends "
                        "where the response leaves the critique's verbatim prefix)")
    if cfg.support == "sampled" and cfg.divergence != "reverse":
        raise UserError("support=sampled estimates reverse KL only; set divergence=reverse")
    if cfg.critic == "http" and not cfg.critic_url and cfg.context.startswith("critique"):
        raise UserError("critic=http needs critic_url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.critic == "hf" and not cfg.critic_model and cfg.context.startswith("critique"):
        raise UserError("critic=hf needs critic_model (a folder or hub id)")


# ---------------------------------------------------------------------------------------------
# Divergences: pure functions of logits. Student first, teacher second; the teacher is a target
# (callers pass it detached or under no_grad), the gradient flows into the student only.

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


def token_divergence(student_logits, teacher_logits, mask=None, divergence="forward", support="full",
                     topk=100, topk_side="student", topk_tail=False, jsd_alpha=0.5, sampled_ids=None,
                     clip=0.0, temperature=1.0, chunk_size=0):
    """Per-token divergence (...,) between student S and teacher T at each position.

    forward: KL(T ‖ S) = Σ_v T(v)·(log T(v) − log S(v))       (the paper's, default)
    reverse: KL(S ‖ T) = Σ_v S(v)·(log S(v) − log T(v))
    jsd:     a·KL(T ‖ M) + (1 − a)·KL(S ‖ M),  M = (1 − a)·S + a·T;  a = 0 → forward, a = 1 → reverse
    sampled: reverse-KL estimator on the sampled token y_t, sg(log S(y) − log T(y))·log S(y); its
             value is a surrogate, its expected gradient under y ~ S is ∇ KL(S ‖ T).
    clip > 0 caps each token's value (capped tokens get no gradient). Masked positions are 0.
    chunk_size > 0 computes the same thing over chunks of positions to bound memory."""
    kwargs = dict(divergence=divergence, support=support, topk=topk, topk_side=topk_side,
                  topk_tail=topk_tail, jsd_alpha=jsd_alpha, clip=clip, temperature=temperature)
    shape = student_logits.shape[:-1]
    chunked = chunk_size and student_logits[..., 0].numel() > chunk_size
    if chunked:  # each chunk applies clip itself
        V = student_logits.shape[-1]
        s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
        ids = None if sampled_ids is None else sampled_ids.reshape(-1)
        values = torch.cat([token_divergence(s[i:i + chunk_size], t[i:i + chunk_size],
                                             sampled_ids=None if ids is None else ids[i:i + chunk_size],
                                             **kwargs)
                            for i in range(0, s.shape[0], chunk_size)]).reshape(shape)
    elif support == "sampled":
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
    if clip > 0 and not chunked:
        values = values.clamp(max=clip)
    return values if mask is None else values * mask


def sequence_mean(per_token, mask):
    """Masked mean over each sequence's response tokens: (B, T) → (B,); empty rows give 0."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def batch_mean(per_token, mask):
    """The paper's reduction: mean over tokens of each sequence, then over sequences that have any."""
    has_tokens = mask.any(-1)
    return sequence_mean(per_token, mask).sum() / has_tokens.sum().clamp(min=1)


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

class ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, per_token_fn, chunk_size):
        # hidden (N, d): the student's hidden states at response positions; weight (V, d): LM head.
        # per_token_fn(logits (C, V), positions slice) -> (C,) values, differentiable in logits.
        N = hidden.shape[0]
        values = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        weight = weight.detach()
        for i in range(0, N, chunk_size):
            positions = slice(i, min(i + chunk_size, N))
            with torch.enable_grad():
                logits = (hidden[positions].detach() @ weight.T).requires_grad_(grad_hidden is not None)
                chunk_values = per_token_fn(logits, positions)  # (C,)
                if grad_hidden is not None:
                    (grad_logits,) = torch.autograd.grad(chunk_values.sum(), logits)  # (C, V)
                    grad_hidden[positions] = grad_logits.to(weight.dtype) @ weight  # (C, d)
            values[positions] = chunk_values.detach().float()
        ctx.save_for_backward(grad_hidden)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        # Each value depends only on its own position, so the upstream gradient is a per-row scale.
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_values[:, None].to(grad_hidden.dtype), None, None, None


def response_hidden(model, rows, T, device):
    """The transformer body's final hidden states at the T positions that predict the response
    tokens: (B, T, d). The LM head is applied later, chunk by chunk (never to prompt positions)."""
    body = model.get_base_model().get_decoder()
    out = body(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device),
               position_ids=rows["position_ids"].to(device), use_cache=False)
    return out.last_hidden_state[:, -T - 1:-1]


# ---------------------------------------------------------------------------------------------
# Model, data, rollouts.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(cfg):
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA device is available; use device=cpu")
    return torch.device(cfg.device)


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{path}': not a model folder, and not "
                        f"reachable on the hub ({type(e).__name__})") from None
    try:
        contexts.check_chat_template(tokenizer, path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(cfg, path, device):
    """The student: a causal LM with a fresh LoRA adapter (the only trainable weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from '{path}': {str(e).splitlines()[0]}") from None
    base.to(device)
    torch.manual_seed(cfg.seed)  # LoRA init
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = [name for name, _ in base.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise UserError(f"lora_targets: {', '.join(unknown)} match no module of {path}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, lora)
    except ValueError as e:
        raise UserError(f"lora_targets={cfg.lora_targets!r} do not match the model's modules: "
                        f"{str(e).splitlines()[0]}") from None
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    check_plain_head(model, device)
    return model, tokenizer


@torch.no_grad()
def check_plain_head(model, device):
    """We apply the LM head ourselves (hidden @ W^T); refuse models whose logits are anything else
    (soft-capping, scaling, a bias), rather than train on a silently wrong distribution."""
    ids = torch.arange(4, device=device)[None] % model.config.vocab_size
    body = model.get_base_model().get_decoder()
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_base_model().get_output_embeddings()
    ours = hidden @ head.weight.T
    theirs = model(input_ids=ids).logits
    if head.bias is not None or not torch.allclose(ours.float(), theirs.float(), atol=1e-3, rtol=1e-3):
        raise UserError("this model's logits are not a plain linear head of its last hidden state; "
                        "selfdistill does not support it")


def load_jsonl(path, need_solution=False):
    """Records with question, answer, optional solution and id. A bad line is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"dataset file {path} not found")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); give a JSONL file, "
                        f"one JSON object per line") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not record["question"].strip() or record.get("answer") in (None, ""):
            raise UserError(f"{path}:{lineno}: each line needs a non-empty 'question' and 'answer'")
        if need_solution and not isinstance(record.get("solution"), str):
            raise UserError(f"{path}:{lineno}: context=reference needs a 'solution' on every line")
        record["answer"] = str(record["answer"])
        if critic.normalize_answer(record["answer"]) == "":
            raise UserError(f"{path}:{lineno}: answer {record['answer']!r} is empty once LaTeX and "
                            f"spaces are stripped; no response could ever match it")
        record.setdefault("id", f"{os.path.basename(path)}:{lineno}")
        records.append(record)
    if not records:
        raise UserError(f"dataset file {path} has no records")
    return records


def batch_for_step(n_records, batch_size, step, seed):
    """Indices of the questions of one step: epochs are fresh permutations laid end to end, so the
    data position is a function of (seed, step) and resuming needs no saved iterator."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_records)
        order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(order[offset]))
    return out


def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def sampling_config(cfg, tokenizer, stop, temperature=None):
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=temperature or cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
                            use_cache=True, remove_invalid_values=True)


@torch.no_grad()
def generate(model, tokenizer, prompts, cfg, device, temperature=None):
    """Sample one response per prompt (lists of ids): KV cache on, left padding, eval mode.
    Returns (responses, truncated): ids up to and including the first EOS; truncated = no EOS."""
    stop = eos_ids(model, tokenizer)
    gen = sampling_config(cfg, tokenizer, stop, temperature)
    was_training = model.training
    model.eval()
    responses, truncated = [], []
    for i in range(0, len(prompts), cfg.generation_batch):
        batch = prompts[i:i + cfg.generation_batch]
        L = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), L), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, p in enumerate(batch):
            input_ids[b, L - len(p):] = torch.tensor(p)
            attention_mask[b, L - len(p):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=gen)
        batch_responses, batch_truncated = cut_at_stop(out[:, L:], stop)
        responses += batch_responses
        truncated += batch_truncated
    model.train(was_training)
    return responses, truncated


def cut_at_stop(new_ids, stop):
    """Rows of sampled ids (B, T), padded after an early EOS → (ids up to and including the first
    stop id, truncated = no stop id at all)."""
    is_stop = torch.isin(new_ids, torch.tensor(sorted(stop), device=new_ids.device))  # (B, T)
    ended = is_stop.any(-1)  # (B,)
    lengths = torch.where(ended, is_stop.int().argmax(-1) + 1, new_ids.shape[1])  # (B,)
    return ([row[:n] for row, n in zip(new_ids.tolist(), lengths.tolist())],
            [not done for done in ended.tolist()])


# ---------------------------------------------------------------------------------------------
# Teachers: base (LoRA off), live (current weights), ema (base + an EMA of the dense LoRA update).

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
def ema_added(model, ema):
    """Inside model.disable_adapter(): add x·ΔW_Tᵀ to each adapted layer's output."""
    hooks = []
    for name, module in lora_modules(model):
        if name in ema:
            def hook(layer, args, output, delta=ema[name]):
                return output + F.linear(args[0].to(delta.dtype), delta).to(output.dtype)
            hooks.append(module.base_layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed, so a kill never leaves a broken one.

def checkpoint_dirs(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def save_checkpoint(run_dir, step, model, optimizer, scheduler, state):
    final = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if os.path.isdir(final):
        return final
    tmp = os.path.join(run_dir, "checkpoints", f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # the adapter only; PeftModel.from_pretrained(base, tmp) loads it
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), **state},
               os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, final)
    return final


def load_checkpoint(path, model, optimizer, scheduler):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter_model.safetensors")))
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    return state


def keep_lines_up_to(path, step):
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if os.path.isfile(path):
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)  # a kill never leaves a truncated log


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare_run_dir(cfg):
    """Create runs/NAME and save the resolved config; a rerun must use the same settings."""
    run_dir = os.path.join(cfg.out_dir, cfg.run)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    resolved = dataclasses.asdict(cfg)
    if os.path.isfile(path) and checkpoint_dirs(run_dir):  # nothing to resume: nothing to refuse
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        changed = [k for k in resolved if k != "eval_at_end" and saved.get(k) != resolved[k]]
        if changed:
            k = changed[0]
            raise UserError(f"run '{cfg.run}' exists with {k}={saved.get(k)!r} (now {resolved[k]!r}); "
                            f"resume with the same settings or choose another --run")
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    os.replace(path + ".tmp", path)  # a kill never leaves a half-written config.yaml
    return run_dir


# ---------------------------------------------------------------------------------------------
# Small helpers for the loop.

def leak_rate(texts, prompts_kind):
    """Share of responses that mention the teacher's privileged prompt (a context-leakage sign)."""
    markers = ("ref:", "fix:") if prompts_kind == "toy" else ("reference solution", "reviewer")
    return sum(any(m in t for m in markers) for t in texts) / max(len(texts), 1)


def ngram_overlap(response, context, n=4):
    """Share of the response's token n-grams that also occur in the context (copying the context)."""
    grams = {tuple(response[i:i + n]) for i in range(len(response) - n + 1)}
    if not grams:
        return 0.0
    seen = {tuple(context[i:i + n]) for i in range(len(context) - n + 1)}
    return len(grams & seen) / len(grams)


class Timer:
    """Seconds per phase; on a GPU it waits for queued kernels at each phase's edges (so a phase is
    not billed for the one before it) and keeps each phase's peak allocated memory in GiB."""
    def __init__(self, device):
        self.device = device if device.type == "cuda" else None
        self.seconds, self.peak_gib = {}, {}

    @contextlib.contextmanager
    def __call__(self, phase):
        if self.device:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if self.device:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self.peak_gib[phase] = max(self.peak_gib.get(phase, 0.0), peak)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def step_seed(cfg, step):
    """The torch seed of one step's sampling: a function of (seed, step), so resuming repeats it."""
    return cfg.seed * 1_000_003 + step


def lr_lambda(cfg, total_steps):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]
    return factor


def resolve_paths(cfg):
    """The model folder and data files; "toy" and empty paths mean the toy world (built if needed)."""
    model, train, test = cfg.model, cfg.train_file, cfg.test_file
    if model == "toy" or not train or not test:
        import toy
        built = toy.ensure_built()
        model = built["model_dir"] if model == "toy" else model
        train, test = train or built["train"], test or built["test"]
    return model, train, test


def make_judge(cfg, device):
    """The frozen critic that writes the step-aligned critiques; checked once before training."""
    settings = {
        "rule": {},
        "hf": dict(model_path=cfg.critic_model, device=str(device), dtype=cfg.dtype,
                   max_new_tokens=cfg.critic_max_new_tokens, trust_remote_code=cfg.trust_remote_code),
        "http": dict(base_url=cfg.critic_url, model=cfg.critic_model, api_key_env=cfg.critic_api_key_env,
                     timeout=cfg.critic_timeout, retries=cfg.critic_retries,
                     max_tokens=cfg.critic_max_new_tokens),
    }[cfg.critic]
    try:
        judge = critic.make_critic(cfg.critic, **settings)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the critic '{cfg.critic_model}': {str(e).splitlines()[0]}") from None
    try:
        judge.check()
    except (ConnectionError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return judge


def toy_dial(cfg):
    """True when the toy world's references are rebuilt with non-default alignment knobs."""
    return cfg.model == "toy" and (cfg.toy_order, cfg.toy_phrasing) != ("grouped", "other")


def toy_restyle(cfg):
    """The no-prefix critique control's rewrite of a step (toy world: the reference-only wording)."""
    if cfg.prompts != "toy":
        return None
    import toy
    return toy.restyle_step


def teacher_context(cfg, record):
    """The reference solution the teacher sees in the `reference` arm."""
    if toy_dial(cfg):
        import toy  # the alignment dial: a reference that follows the chain and/or its phrasing
        return toy.reference_solution(record["question"], cfg.toy_order, cfg.toy_phrasing)
    return record["solution"]


# ---------------------------------------------------------------------------------------------
# The two losses, accumulated over micro-batches (their gradients add up to the step's).

def teacher_hidden(model, cfg, rows, T, device, ema):
    """π_T's hidden states at the response positions. No gradient ever flows into the teacher."""
    model.eval()
    with torch.no_grad():
        if cfg.teacher == "base":
            with model.disable_adapter():  # the initial base model: LoRA switched off (the paper)
                hidden = response_hidden(model, rows, T, device)
        elif cfg.teacher == "ema":
            with model.disable_adapter(), ema_added(model, ema):  # base + EMA of the LoRA update
                hidden = response_hidden(model, rows, T, device)
        else:  # live: the current student weights, detached
            hidden = response_hidden(model, rows, T, device)
    model.train()
    return hidden


def distill_backward(model, cfg, items, pad_id, weight, device, timer, ema):
    """∇ L_SD over samples (student prompt ids, teacher prompt ids, response ids)."""
    totals = {"loss": 0.0, "divergence": 0.0, "entropy": 0.0, "tokens": 0}
    for i in range(0, len(items), cfg.micro_batch):
        part = items[i:i + cfg.micro_batch]
        student, teacher = contexts.build_pair([p[0] for p in part], [p[1] for p in part],
                                               [p[2] for p in part], pad_id)
        mask = student["response_mask"].to(device)  # (B, T) the same grid in both rows
        T = mask.shape[1]
        with timer("teacher"):
            teacher_h = teacher_hidden(model, cfg, teacher, T, device, ema)[mask]  # (N, d)
        with timer("student"):
            student_h = response_hidden(model, student, T, device)[mask]  # (N, d), with gradient
            sampled_ids = student["input_ids"][:, -T:].to(device)[mask]  # (N,) the tokens ŷ_t
            entropy = torch.zeros(sampled_ids.shape[0], device=device)

            def per_token(student_logits, positions):  # (C, V) → (C,)
                with torch.no_grad():
                    teacher_logits = teacher_h[positions] @ weight.T  # (C, V), a fixed target
                    logp = (student_logits.float() / cfg.logit_temperature).log_softmax(-1)
                    entropy[positions] = -(logp.exp() * logp).sum(-1)
                return token_divergence(student_logits, teacher_logits, divergence=cfg.divergence,
                                        support=cfg.support, topk=cfg.topk, topk_side=cfg.topk_side,
                                        topk_tail=cfg.topk_tail, jsd_alpha=cfg.jsd_alpha,
                                        sampled_ids=sampled_ids[positions], clip=cfg.token_clip,
                                        temperature=cfg.logit_temperature)

            values = ChunkedHead.apply(student_h, weight, per_token, cfg.chunk_size)  # (N,)
            per_token_grid = torch.zeros(mask.shape, device=device).masked_scatter(mask, values)
            span = distilled_span(mask, [p[3] for p in part])  # (B, T) the tokens that count
            # 1/|ŷ| Σ_t over the distilled tokens: the divisor is the full response length
            loss = ((per_token_grid * span).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / len(items)
            loss.backward()
        totals["loss"] += loss.item()
        totals["divergence"] += (per_token_grid * span).sum().item()
        totals["entropy"] += (entropy * span[mask]).sum().item()
        totals["tokens"] += int(span.sum())
    return totals


def distilled_span(mask, lengths):
    """(B, T) the response tokens that enter the loss: all (length None) or the first `length`
    of each response (responses are right-aligned in the grid)."""
    span = mask.clone()
    T = mask.shape[1]
    for b, n in enumerate(lengths):
        if n is not None:
            start = T - int(mask[b].sum())
            span[b, start + n:] = False
    return span


def grpo_backward(model, cfg, prompts, responses, advantages, pad_id, weight, device, timer):
    """∇ of the token-mean policy gradient; samples with A_i = 0 carry no signal and are skipped."""
    keep = [i for i in range(len(responses)) if advantages[i] != 0]
    n_tokens = sum(len(responses[i]) for i in keep)
    totals = {"loss": 0.0, "entropy": 0.0, "tokens": 0}
    for i in range(0, len(keep), cfg.micro_batch):
        part = keep[i:i + cfg.micro_batch]
        rows = contexts.build_rows([prompts[j] for j in part], [responses[j] for j in part], pad_id)
        mask = rows["response_mask"].to(device)
        T = mask.shape[1]
        with timer("student"):
            hidden = response_hidden(model, rows, T, device)[mask]  # (N, d)
            sampled_ids = rows["input_ids"][:, -T:].to(device)[mask]  # (N,)
            entropy = torch.zeros(sampled_ids.shape[0], device=device)

            def per_token(student_logits, positions):  # log π_θ(ŷ_t | x, ŷ<t): (C, V) → (C,)
                logp = (student_logits.float() / cfg.logit_temperature).log_softmax(-1)
                with torch.no_grad():
                    entropy[positions] = -(logp.exp() * logp).sum(-1)
                return logp.gather(-1, sampled_ids[positions, None]).squeeze(-1)

            logp = ChunkedHead.apply(hidden, weight, per_token, cfg.chunk_size)  # (N,)
            logp_grid = torch.zeros(mask.shape, device=device).masked_scatter(mask, logp)
            A = advantages[part].to(device)  # (B,)
            loss = policy_gradient_loss(logp_grid, A, mask, n_tokens)
            loss.backward()
        totals["loss"] += loss.item()
        totals["entropy"] += entropy.sum().item()
        totals["tokens"] += logp.numel()
    return totals


# ---------------------------------------------------------------------------------------------
# The loop: sample → judge → teacher → student → loss → step → log → checkpoint.

def train(cfg):
    from tqdm import tqdm
    device = pick_device(cfg)
    model_path, train_path, test_path = resolve_paths(cfg)
    records = load_jsonl(train_path, need_solution=cfg.context == "reference" and not toy_dial(cfg))
    if cfg.eval_at_end:
        load_jsonl(test_path)  # a typo in test_file must not cost the whole run
    run_dir = prepare_run_dir(cfg)
    print(f"config ({os.path.join(run_dir, 'config.yaml')}): "
          + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    judge = make_judge(cfg, device) if cfg.context.startswith("critique") or cfg.analysis_every else None
    model, tokenizer = load_model(cfg, model_path, device)
    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA factors only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(records) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d) the frozen LM head
    if cfg.support == "topk" and cfg.topk >= weight.shape[0]:
        raise UserError(f"support=topk with topk={cfg.topk} >= the vocabulary size {weight.shape[0]} is "
                        f"support=full; set support=full or a smaller topk")
    metrics_path, samples_path = (os.path.join(run_dir, f) for f in ("metrics.jsonl", "samples.jsonl"))
    start, ema, nonfinite = 0, {}, 0
    if checkpoint_dirs(run_dir):
        state = load_checkpoint(checkpoint_dirs(run_dir)[-1], model, optimizer, scheduler)
        start, ema, nonfinite = state["step"], state["ema"], state["nonfinite"]
        print(f"resuming {run_dir} after step {start}")
    keep_lines_up_to(metrics_path, start)
    keep_lines_up_to(samples_path, start)
    stop = handle_signals()
    G, pad_id = cfg.samples_per_question, tokenizer.pad_token_id

    def checkpoint(step):
        return save_checkpoint(run_dir, step, model, optimizer, scheduler,
                               {"step": step, "ema": ema, "nonfinite": nonfinite,
                                "data_position": step * cfg.batch_size})

    for step in tqdm(range(start, total_steps), initial=start, total=total_steps, desc=cfg.run):
        timer, step_start = Timer(device), time.perf_counter()
        torch.manual_seed(step_seed(cfg, step))  # per step, so a resumed run samples the same
        batch = [records[i] for i in batch_for_step(len(records), cfg.batch_size, step, cfg.seed)]
        gold = [r for r in batch for _ in range(G)]  # each question repeated G times
        # 1. sample ŷ ~ π_θ(· | x): the student sees the question only
        with timer("generate"):
            prompts = [contexts.student_prompt_ids(tokenizer, r["question"], cfg.prompts,
                                                   cfg.student_thinking) for r in gold]
            responses, truncated = generate(model, tokenizer, prompts, cfg, device)
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rewards = torch.tensor([critic.reward(t, r["answer"]) for t, r in zip(texts, gold)])
        # 2. judge: the teacher's context c for each sample
        valid, context_texts = [True] * len(texts), [None] * len(texts)
        with timer("critic"):
            if cfg.context.startswith("critique"):
                critiques = judge([r["question"] for r in gold], texts,
                                  [r.get("solution", "") for r in gold], [r["answer"] for r in gold])
                valid = [c is not None and critic.validate_critique(t, c, r["answer"])[0]
                         for t, c, r in zip(texts, critiques, gold)]
                # the arm's form of each valid critique (the two controls rewrite it)
                context_texts = [contexts.critique_form(cfg.context, t, c, toy_restyle(cfg)) if ok else c
                                 for t, c, ok in zip(texts, critiques, valid)]
            elif cfg.context == "reference":
                context_texts = [teacher_context(cfg, r) for r in gold]
        # 3-4. teacher and student on the same ŷ, loss, backward
        if cfg.context == "grpo":
            advantages, flat_groups = grpo_advantages(rewards.view(-1, G))
            totals = grpo_backward(model, cfg, prompts, responses, advantages.view(-1), pad_id,
                                   weight, device, timer)
            zero_signal = flat_groups / len(batch)
        else:
            with timer("critic"):  # prompt building belongs to the context phase
                items = [(prompts[i], contexts.teacher_prompt_ids(
                    tokenizer, gold[i]["question"], context_texts[i], cfg.context, cfg.prompts,
                    cfg.teacher_thinking, cfg.max_context_tokens), responses[i],
                    None if cfg.distill_span == "all" else 1 + contexts.departure_index(
                        responses[i], tokenizer(critiques[i], add_special_tokens=False)["input_ids"]))
                    for i in range(len(texts)) if valid[i]]
            totals = distill_backward(model, cfg, items, pad_id, weight, device, timer, ema)
            zero_signal = 1 - len(items) / len(texts)
        # 5. update the LoRA weights (a non-finite loss or gradient skips the update)
        with timer("optimizer"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
            finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                if cfg.teacher == "ema":
                    ema_update(ema, model, cfg.ema_rate)
            nonfinite = 0 if finite else nonfinite + 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # 6. log
        record = {
            "step": step + 1, "train/loss": totals["loss"],
            "train/reward": rewards.mean().item(),
            "train/response_len": sum(map(len, responses)) / len(responses),
            "train/truncated": sum(truncated) / len(truncated),
            "train/entropy": totals["entropy"] / max(totals["tokens"], 1),
            "train/critique_invalid": valid.count(False), "train/zero_signal": zero_signal,
            "train/leak_rate": leak_rate(texts, cfg.prompts),
            "train/context_overlap": sum(ngram_overlap(r, tokenizer(c, add_special_tokens=False)["input_ids"])
                                         for r, c in zip(responses, context_texts) if c) / len(texts),
            "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
            "train/nonfinite": int(not finite),
            **{f"time/{k}": round(v, 3) for k, v in timer.seconds.items()},
            **{f"memory/{k}": round(v, 2) for k, v in timer.peak_gib.items()},
        }
        if "divergence" in totals:  # no teacher, no divergence in grpo
            record["train/kl"] = totals["divergence"] / max(totals["tokens"], 1)
        if cfg.analysis_every and (step + 1) % cfg.analysis_every == 0:
            import eval as evaluation  # per-token advantage statistics on this step's rollouts
            rollouts = [{**gold[i], "response_ids": responses[i],
                         **({"critique": critiques[i]} if cfg.context.startswith("critique") else {})}
                        for i in range(len(gold))]
            with timer("analysis"):
                record.update(evaluation.training_analysis(model, tokenizer, cfg, device, rollouts, judge))
        record["time/step"] = round(time.perf_counter() - step_start, 3)  # all of it up to this line
        append_jsonl(metrics_path, record)
        kl_text = f" | kl {record['train/kl']:.4f}" if "train/kl" in record else ""
        tqdm.write(f"step {step + 1}/{total_steps} | loss {record['train/loss']:.4f}{kl_text}"
                   f" | reward {record['train/reward']:.3f} | len {record['train/response_len']:.1f}"
                   f" | invalid {record['train/critique_invalid']} | {record['time/step']:.1f}s"
                   + ("" if finite else " | update skipped (non-finite)"))
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0 or step == 0:
            for i, r in enumerate(gold):
                append_jsonl(samples_path, {"step": step + 1, "id": r["id"], "question": r["question"],
                                            "response": texts[i], "reward": rewards[i].item(),
                                            "context": context_texts[i], "valid": valid[i],
                                            "truncated": truncated[i]})
        # 7. checkpoint
        done = step + 1 == total_steps
        give_up = not finite and nonfinite >= cfg.max_nonfinite
        if done or (step + 1) % cfg.checkpoint_every == 0 or stop["signal"] or give_up:
            checkpoint(step + 1)
        if give_up:
            raise UserError(f"stopping: {nonfinite} steps in a row had a non-finite loss or gradient "
                            f"(last at step {step + 1}); lower lr or check the data")
        if stop["signal"]:
            print(f"stopped by signal {stop['signal']} after step {step + 1}; checkpoint saved, "
                  f"rerun the same command to resume")
            sys.exit(128 + stop["signal"])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # evaluation: Ctrl-C stops at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if cfg.eval_at_end:
        import eval as evaluation
        evaluation.evaluate_run(run_dir, model=model, tokenizer=tokenizer)
    return run_dir, model


def handle_signals():
    """SIGINT/SIGTERM finish the current step and write a checkpoint; a second one quits at once."""
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\nsignal {signum}: finishing this step, then saving a checkpoint", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


@contextlib.contextmanager
def user_errors():
    """A user's mistake (or an unreachable critic) becomes one line on stderr and exit code 2;
    SELFDISTILL_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except (UserError, ConnectionError) as e:
        if os.environ.get("SELFDISTILL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    with user_errors():
        train(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
