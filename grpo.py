"""The GRPO baseline (the `grpo` arm: no teacher, a binary reward): group-normalised advantages and
the policy-gradient loss, with its three normalisations (`grpo_norm`) and the optional KL penalty to
the reference policy (`grpo_beta`). Pure functions of tensors; selfdistill.train calls them, and
where the gradient stops is written there. Checked against TRL's GRPOTrainer._compute_loss on the
same tensors in tests/test_grpo.py.
"""
import torch

import chunked_head

NORMS = ("token_mean", "sequence_mean", "constant")


def grpo_advantages(rewards, eps=1e-6):
    """A_i = (r_i − mean(r)) / (std(r) + ε) within each group. rewards (Q, G) → (Q, G), #flat groups."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # Bessel-corrected, as in TRL's GRPO
    zero_variance = int((std.squeeze(-1) == 0).sum())
    return (rewards - mean) / (std + eps), zero_variance


def k3(logp, ref_logp):
    """The k3 estimator of KL(π_θ ‖ π_ref) at the sampled token (Schulman 2020, as DeepSeekMath's
    GRPO and TRL use it): r − log r − 1 with r = π_ref(ŷ_t) / π_θ(ŷ_t). Each term is ≥ 0, and its
    mean over ŷ ~ π_θ is the KL."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def policy_gradient_loss(logp, advantages, mask, divisor, norm="token_mean", ref_logp=None, beta=0.0):
    """ℓ_it = −A_i·log π_θ(ŷ_it) + β·k3_it on one micro-batch, divided by the whole step's `divisor`:

      token_mean:    Σ_i Σ_t ℓ_it / Σ_i |ŷ_i|              divisor: the step's kept tokens (default; TRL "bnpo")
      sequence_mean: Σ_i (1/|ŷ_i|) Σ_t ℓ_it / #sequences    divisor: the step's kept sequences (GRPO paper; TRL "grpo")
      constant:      Σ_i Σ_t ℓ_it / (L · B·G)               divisor: max_new_tokens × the step's rollouts
                                                            (Dr. GRPO; TRL "dr_grpo": max_completion_length × rows)

    logp, ref_logp (B, T) log π_θ and log π_ref of the sampled tokens (ref_logp without gradient);
    advantages (B,); mask (B, T) the response tokens."""
    per_token = -advantages[:, None] * logp  # (B, T) the policy gradient's term
    if beta:
        per_token = per_token + beta * k3(logp, ref_logp)  # (B, T) pulled back toward π_ref
    per_token = per_token * mask  # (B, T)
    if norm == "sequence_mean":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / divisor
    return per_token.sum() / divisor


def grpo_loss(student_h, weight, sampled_ids, advantages, mask, divisor, cfg, reference_h=None):
    """The policy-gradient loss on one micro-batch from hidden states (N, d) at the response
    positions, through the LM head chunk by chunk; reference_h (N, d): the reference's hidden states
    (a no-grad forward with the adapter off), needed when grpo_beta > 0. Returns (loss, stats)."""
    N = student_h.shape[0]
    entropy, ref_logp = torch.zeros(N, device=student_h.device), torch.zeros(N, device=student_h.device)

    def per_token(student_logits, positions):  # log π_θ(ŷ_t | x, ŷ<t): (C, V) → (C,)
        logp = (student_logits.float() / cfg.logit_temperature).log_softmax(-1)
        y = sampled_ids[positions, None]
        with torch.no_grad():  # entropy is a diagnostic; π_ref is a fixed target
            entropy[positions] = -(logp.exp() * logp).sum(-1)
            if reference_h is not None:
                ref_logits = (reference_h[positions] @ weight.T).float() / cfg.logit_temperature  # (C, V)
                ref_logp[positions] = ref_logits.log_softmax(-1).gather(-1, y).squeeze(-1)
        return logp.gather(-1, y).squeeze(-1)

    logp = chunked_head.ChunkedHead.apply(student_h, weight, per_token, cfg.chunk_size)  # (N,)
    grid = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, logp)  # (B, T)
    ref_grid = torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, ref_logp)  # (B, T)
    loss = policy_gradient_loss(grid, advantages, mask, divisor, cfg.grpo_norm, ref_grid, cfg.grpo_beta)
    kl = k3(logp.detach(), ref_logp).sum().item() if reference_h is not None else 0.0  # Σ_t k3: train/kl
    return loss, {"entropy": entropy.sum().item(), "tokens": N, "divergence": kl}
