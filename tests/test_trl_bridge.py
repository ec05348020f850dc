"""The bridge for TRL and verl users. Protects: every TRL / verl setting name in options.PEER_NAMES
answers with our name (or says there is none, and why) instead of a spelling guess, names a real
Config field, and has its row in docs/trl.md; and the self-distillation divergences
(selfdistill.token_divergence) against a peer: TRL's experimental SDPO and SDFT loss functions
(trl==1.16.0 from requirements-extras.txt, trl/experimental/{sdpo,sdft}/loss_utils.py) on the same
logits, values and gradients.

Mapping (docs/trl.md): TRL's distillation_alpha 0 is our divergence=forward, KL(T ‖ S); 1 is
divergence=reverse, KL(S ‖ T); in between it is our jsd with jsd_alpha = distillation_alpha (both
M = (1 − a)·S + a·T, a·KL(T ‖ M) + (1 − a)·KL(S ‖ M)). distillation_mode full_logits is support=full;
topk_logits with distillation_topk = k is support=topk, topk_side=student (TRL picks the student's
top k), with distillation_add_tail = topk_tail; sampled_token is support=sampled (reverse only).
TRL's importance clip (distillation_is_clip) and its GRPO mix (distillation_weight) have no
counterpart here and are left out.

TRL runs in float64; ours computes in float32 whatever the input (support_log_probs casts), so the
agreement is float32's: the largest differences are printed by test_parity_summary (pytest -s).
TRL's tail bucket is log(1 − Σ_k p) from the top-k mass, ours log Σ_rest p from the other logits:
equal in exact arithmetic, so the logits are drawn with a tail that holds real mass.
"""
import os

import pytest
import torch

from plumbing import options
import selfdistill
from plumbing.common import UserError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Their names, our names


@pytest.mark.parametrize("name, ours", [("learning_rate", "lr"), ("num_generations", "samples_per_question"),
                                        ("max_completion_length", "max_new_tokens"), ("beta", "grpo_beta"),
                                        ("loss_type", "grpo_norm"), ("distillation_topk", "topk"),
                                        ("teacher_model_kind", "teacher"), ("actor_rollout_ref.rollout.n",
                                                                            "samples_per_question")])
def test_the_issues_names_get_ours_back(name, ours):
    with pytest.raises(UserError, match=f"unknown config key '{name}' \\(TRL's or verl's name; ours is '{ours}'"):
        selfdistill.load_config([f"{name}=1"])


def test_every_peer_name_answers_with_a_field_and_has_a_row_in_the_docs():
    fields = set(selfdistill.Config.__dataclass_fields__)
    docs = open(os.path.join(ROOT, "docs", "trl.md"), encoding="utf-8").read()
    for name, (ours, why) in options.PEER_NAMES.items():
        assert name not in fields, name  # a name of ours is never redirected
        assert ours in fields or (ours is None and why), name
        assert f"`{name}`" in docs, f"docs/trl.md has no row for {name}"
        with pytest.raises(UserError) as error:
            options.check_key(selfdistill.Config, "++" + name if name.startswith("actor") else name)
        assert (f"ours is '{ours}'" if ours else "no such setting here") in str(error.value)


def test_names_of_no_peer_still_get_a_spelling_guess():
    with pytest.raises(UserError, match="unknown config key 'ema_rat' \\(did you mean 'ema_rate'\\?\\)"):
        options.check_key(selfdistill.Config, "ema_rat")


# ---------------------------------------------------------------------------------------------
# The divergences against TRL's

B, T, V, K = 3, 5, 40, 8  # (B, T, V) logits, top-K support
TOLERANCE = 2e-5  # float32 against float64, on values of order 1
MAX_ABS = {}


def loss_modules():
    pytest.importorskip("trl")
    from trl.experimental.sdft import loss_utils as sdft
    from trl.experimental.sdpo import loss_utils as sdpo
    return {"sdpo": sdpo, "sdft": sdft}


def logits(seed):
    """Student and teacher logits (B, T, V) in float64, spread so that no entry dominates, and the
    weights that turn the per-token values into one scalar to differentiate."""
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64))
    teacher = student + 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    return student, teacher, weights


def both(ours, theirs, seed):
    """(value difference, gradient difference) of ours and theirs, both d(Σ w·D)/d student logits."""
    student, teacher, weights = logits(seed)
    results = []
    for function in (ours, theirs):
        s = student.clone().requires_grad_()
        values = function(s, teacher)  # (B, T)
        (weights * values).sum().backward()
        results.append((values.detach().double(), s.grad))
    (ours_v, ours_g), (theirs_v, theirs_g) = results
    assert ours_v.shape == theirs_v.shape == (B, T)
    return (ours_v - theirs_v).abs().max().item(), (ours_g - theirs_g).abs().max().item()


def check(name, differences):
    MAX_ABS[name] = differences
    assert differences[0] < TOLERANCE and differences[1] < TOLERANCE, (name, differences)


ALPHAS = {0.0: ("forward", 0.5), 1.0: ("reverse", 0.5), 0.5: ("jsd", 0.5), 0.3: ("jsd", 0.3)}


@pytest.mark.parametrize("module", ["sdpo", "sdft"])
@pytest.mark.parametrize("alpha", list(ALPHAS))
def test_full_vocabulary(module, alpha):
    trl = loss_modules()[module]
    divergence, jsd_alpha = ALPHAS[alpha]
    check(f"{module} full α={alpha}", both(
        lambda s, t: selfdistill.token_divergence(s, t, divergence, "full", jsd_alpha=jsd_alpha),
        lambda s, t: trl.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha), seed=1))


@pytest.mark.parametrize("module", ["sdpo", "sdft"])
@pytest.mark.parametrize("alpha", list(ALPHAS))
@pytest.mark.parametrize("tail", [False, True])
def test_student_top_k(module, alpha, tail):
    trl = loss_modules()[module]
    divergence, jsd_alpha = ALPHAS[alpha]
    check(f"{module} top-{K}{' + tail' if tail else ''} α={alpha}", both(
        lambda s, t: selfdistill.token_divergence(s, t, divergence, "topk", topk=K, topk_side="student",
                                                  topk_tail=tail, jsd_alpha=jsd_alpha),
        lambda s, t: trl.compute_topk_self_distillation_loss(s, t, distillation_topk=K, distillation_alpha=alpha,
                                                             distillation_add_tail=tail), seed=2))


@pytest.mark.parametrize("module", ["sdpo", "sdft"])
def test_sampled_token(module):
    trl = loss_modules()[module]
    ids = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(3))
    check(f"{module} sampled", both(
        lambda s, t: selfdistill.token_divergence(s, t, "reverse", "sampled", sampled_ids=ids),
        lambda s, t: trl.compute_sampled_token_self_distillation_loss(s, t, ids, distillation_alpha=1.0), seed=3))


def test_the_directions_are_not_interchangeable():
    """The parity above can fail: forward against TRL's reverse differs by far more than the tolerance."""
    trl = loss_modules()["sdpo"]
    value, gradient = both(lambda s, t: selfdistill.token_divergence(s, t, "forward"),
                           lambda s, t: trl.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=1.0),
                           seed=1)
    assert value > 100 * TOLERANCE and gradient > 100 * TOLERANCE


def test_parity_summary():
    """Prints the largest differences seen above (run with -s to read them)."""
    for name, (value, gradient) in sorted(MAX_ABS.items()):
        print(f"{name:<28} value {value:.1e}  gradient {gradient:.1e}")
