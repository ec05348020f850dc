"""Protects the GRPO baseline's loss (grpo.py): its three normalisations and the k3 KL penalty by
hand, grpo_loss's reference path against float64 autograd, and parity with TRL's GRPO loss
(GRPOTrainer._compute_loss, trl==1.16.0 from requirements-extras.txt) on the same tensors.

TRL's loss is a method of its trainer; we call the method itself on a stand-in for the trainer that
holds only the settings it reads (loss_type, beta, clip ε, ...) and returns our crafted per-token
log-probabilities where TRL would run the model. So TRL's own arithmetic — ratio, k3 KL, masking,
normalisation — runs on our tensors. Mapping: token_mean ↔ "bnpo" (one micro-batch = the step),
sequence_mean ↔ "grpo", constant ↔ "dr_grpo" (max_completion_length = max_new_tokens).

One known difference, by design: at ratio 1 TRL's policy term is −A·π/sg(π), value −A per token,
ours −A·log π; both have the gradient −A·∇log π. So gradients are compared as they are, and values
after evaluating ours at log π − sg(log π) + 1 (value 1, gradient ∇log π) for log π and log π_ref
shifted by the same amount (k3 depends on their difference only): then both sides are the same
function of the same tensors, value and gradient.
"""
import collections
import types

import pytest
import torch

import grpo
import selfdistill

# ---------------------------------------------------------------------------------------------
# By hand


def test_normalisations_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # per-sequence sums: −2·(−3) = 6 and 1·(−4.75) = −4.75
    assert grpo.policy_gradient_loss(logp, advantages, mask, 5).item() == pytest.approx(1.25 / 5)
    want = (6 / 2 + -4.75 / 3) / 2
    assert grpo.policy_gradient_loss(logp, advantages, mask, 2, "sequence_mean").item() == pytest.approx(want)
    assert grpo.policy_gradient_loss(logp, advantages, mask, 3 * 2, "constant").item() == pytest.approx(1.25 / 6)


def test_k3_by_hand():
    logp, ref_logp = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.5])
    r = (ref_logp - logp).exp()
    torch.testing.assert_close(grpo.k3(logp, ref_logp), r - r.log() - 1)
    assert grpo.k3(logp, ref_logp)[0] == 0 and (grpo.k3(logp, ref_logp) >= 0).all()
    # its mean under y ~ π_θ is KL(π_θ ‖ π_ref): exact when summed against π_θ's probabilities
    p, q = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.4, 0.4, 0.2])
    assert (p * grpo.k3(p.log(), q.log())).sum().item() == pytest.approx((p * (p / q).log()).sum().item())


@pytest.mark.parametrize("norm", grpo.NORMS)
def test_grpo_loss_with_reference_matches_float64(norm):
    """grpo_loss with reference hidden states: −A·log π_θ + β·k3 through the chunked head equals the
    float64 computation with the LM head applied whole; no gradient reaches the reference."""
    g = torch.Generator().manual_seed(3)
    d, V, beta = 5, 11, 0.3
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    N = int(mask.sum())
    student_h, reference_h = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g, requires_grad=True)
    weight, ids = torch.randn(V, d, generator=g), torch.randint(0, V, (N,), generator=g)
    advantages, divisor = torch.tensor([1.5, -0.5, 0.0]), {"token_mean": N, "sequence_mean": 3, "constant": 12}[norm]
    h = student_h.double().requires_grad_(True)
    logp = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(
        mask, (h @ weight.double().T).log_softmax(-1).gather(-1, ids[:, None])[:, 0])
    ref = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(
        mask, (reference_h.detach().double() @ weight.double().T).log_softmax(-1).gather(-1, ids[:, None])[:, 0])
    want = grpo.policy_gradient_loss(logp, advantages.double(), mask, divisor, norm, ref, beta)
    want.backward()
    cfg = selfdistill.Config(arm="grpo", grpo_norm=norm, grpo_beta=beta, chunk_size=4)
    ours_h = student_h.clone().requires_grad_(True)
    loss, stats = grpo.grpo_loss(ours_h, weight, ids, advantages, mask, divisor, cfg, reference_h)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(ours_h.grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    assert reference_h.grad is None
    assert stats["divergence"] == pytest.approx(grpo.k3(logp, ref)[mask].sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Parity with TRL's GRPOTrainer._compute_loss


def trl_loss(per_token_logps, ref_per_token_logps, advantages, mask, loss_type, beta, max_completion_length):
    """TRL's own _compute_loss on a stand-in trainer: the model's forward is replaced by our
    per-token log-probabilities; every other line is TRL's."""
    GRPOTrainer = pytest.importorskip("trl").GRPOTrainer
    identity = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                     gather_for_metrics=lambda x: x, sync_gradients=True, num_processes=1)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=identity, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)})
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "ref_per_token_logps": ref_per_token_logps}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


TRL_NAMES = {"token_mean": "bnpo", "sequence_mean": "grpo", "constant": "dr_grpo"}
MAX_ABS = {}  # the largest differences seen, printed by test_trl_parity_summary (pytest -s)


@pytest.mark.parametrize("beta", [0.0, 0.04, 1.0])
@pytest.mark.parametrize("norm", grpo.NORMS)
def test_matches_trl(norm, beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(7)
    B, T, L = 6, 9, 12  # L = max_new_tokens = max_completion_length
    lengths = torch.tensor([9, 3, 7, 1, 5, 9])
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) TRL's completions are left-aligned
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref_logp = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    advantages = torch.randn(B, generator=g, dtype=torch.float64)  # all ≠ 0: we keep them all
    divisor = {"token_mean": int(mask.sum()), "sequence_mean": B, "constant": L * B}[norm]

    theirs = trl_loss(logp, ref_logp, advantages, mask, TRL_NAMES[norm], beta, L)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    ours = grpo.policy_gradient_loss(logp, advantages, mask, divisor, norm, ref_logp, beta)
    (our_grad,) = torch.autograd.grad(ours, logp)
    shift = logp - logp.detach() + 1  # value 1, gradient ∇log π: TRL's ratio at 1, to first order
    ours_shifted = grpo.policy_gradient_loss(shift, advantages, mask, divisor, norm,
                                             ref_logp - logp.detach() + 1, beta)
    (shifted_grad,) = torch.autograd.grad(ours_shifted, logp)
    value_diff = abs(ours_shifted.item() - theirs.item())
    grad_diff = max((our_grad - their_grad).abs().max().item(), (shifted_grad - their_grad).abs().max().item())
    MAX_ABS[norm, beta] = (value_diff, grad_diff)
    assert value_diff < 1e-12 and grad_diff < 1e-12
    assert their_grad.abs().max() > 1e-3  # not a vacuous comparison
    if beta == 0.0:  # without KL TRL's value is −Σ A / divisor, ours −Σ A·log π / divisor
        assert theirs.item() == pytest.approx(grpo.policy_gradient_loss(torch.ones_like(logp), advantages,
                                                                        mask, divisor, norm).item())


def test_trl_parity_summary():
    """Prints the largest differences of test_matches_trl (run with -s to read them)."""
    if MAX_ABS:
        values, grads = zip(*MAX_ABS.values())
        print(f"\nTRL parity over {len(MAX_ABS)} cases: max |Δ value| {max(values):.1e}, max |Δ grad| {max(grads):.1e}")
