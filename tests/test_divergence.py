"""Divergences, the chunked LM head and the two losses, checked against brute force on CPU in seconds.

Protects: the value of every divergence (forward KL(T‖S), reverse KL(S‖T), the generalised JSD at
a ∈ {0, 0.1, 0.5, 0.9, 1}) on every support (full vocabulary; top-k picked by the student or the
teacher, renormalised or with a tail bucket; the sampled-token reverse-KL estimator) against a
float64 reference written here by hand (softmax, KL sums, top-k by sorting, tail = the mass left
outside the top k), at every position; top-k with k = V is the full vocabulary; the per-token clip
caps values and stops their gradient; chunking (ChunkedHead's over the masked positions, the only
one) changes no value or gradient; the student's gradient matches finite differences, and neither
the teacher (through sd_loss, as the training loop calls it) nor the LM head gets one; the sampled
estimator's mean gradient is ∇ KL(S‖T); sd_loss's reduction (each sequence's distilled tokens
summed and divided by its full length, summed over sequences, divided by the step's sequence
count; an empty row adds 0) by hand and against a float64 brute force, with its stats and A_t;
the GRPO advantage and policy-gradient loss by hand, grpo_loss against float64 autograd;
ChunkedHead equals the naive "all logits, then the per-token function" path in value and in
gradient, also with chunk_size=0, whose chunk comes from the memory budget (chunk_positions)."""
import math

import pytest
import torch

import chunked_head
import contexts
import selfdistill
from chunked_head import ChunkedHead
from selfdistill import Config, grpo_advantages, policy_gradient_loss, sd_loss, token_divergence


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which on a shared
    2-core machine costs milliseconds per operation. Restored afterwards for the other files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The float64 reference. Deliberately no log_softmax / logsumexp / topk / kl from torch or from
# selfdistill: exp, log, sum and sort only, so a shared mistake is unlikely.

DIVERGENCES = [("forward", 0.5), ("reverse", 0.5)] + [("jsd", a) for a in (0.0, 0.1, 0.5, 0.9, 1.0)]
SUPPORTS = [  # (support, topk_side, topk_tail)
    ("full", "student", False),
    ("topk", "student", False), ("topk", "student", True),
    ("topk", "teacher", False), ("topk", "teacher", True),
]


def ref_log_softmax(x):
    """log p over the last axis, by hand: x − max − log Σ exp(x − max)."""
    z = x - x.amax(-1, keepdim=True)
    return z - z.exp().sum(-1, keepdim=True).log()


def ref_kl(logp, logq):
    """Σ_v p(v)·(log p(v) − log q(v)), with 0·log 0 = 0 (a bucket that holds no mass adds nothing)."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def ref_support(s, t, support, k, side, tail):
    """Both sides' float64 log-probabilities on the support, from logits s, t (..., V)."""
    if support == "full":
        return ref_log_softmax(s), ref_log_softmax(t)
    order = (s if side == "student" else t).sort(-1, descending=True).indices[..., :k]  # top k
    if not tail:  # renormalise the k gathered logits
        return ref_log_softmax(s.gather(-1, order)), ref_log_softmax(t.gather(-1, order))
    out = []
    for x in (s, t):
        p = ref_log_softmax(x).exp()  # (..., V)
        inside = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, True)
        # tail = 1 − Σ_k p, summed over the tokens outside the top k (no cancellation)
        rest = torch.where(inside, torch.zeros_like(p), p).sum(-1, keepdim=True)
        out.append(torch.cat([p.gather(-1, order), rest], -1).log())  # log 0 = −inf: no mass
    return out[0], out[1]


def reference(student_logits, teacher_logits, divergence="forward", a=0.5, support="full", k=1,
              side="student", tail=False, sampled_ids=None, temperature=1.0):
    """The per-token divergence in float64, shape (...,)."""
    s = student_logits.double() / temperature
    t = teacher_logits.double() / temperature
    if support == "sampled":  # sg(log S(y) − log T(y))·log S(y)
        s_y = ref_log_softmax(s).gather(-1, sampled_ids[..., None])[..., 0]
        t_y = ref_log_softmax(t).gather(-1, sampled_ids[..., None])[..., 0]
        return (s_y - t_y) * s_y
    s_logp, t_logp = ref_support(s, t, support, k, side, tail)
    if divergence == "forward" or (divergence == "jsd" and a == 0.0):  # the special-cased ends
        return ref_kl(t_logp, s_logp)
    if divergence == "reverse" or (divergence == "jsd" and a == 1.0):
        return ref_kl(s_logp, t_logp)
    m_logp = ((1 - a) * s_logp.exp() + a * t_logp.exp()).log()  # M = (1 − a)·S + a·T
    return a * ref_kl(t_logp, m_logp) + (1 - a) * ref_kl(s_logp, m_logp)


def ks_for(V):
    return {1: [1], 7: [1, 3, 6, 7], 1000: [1, 10, 100]}[V]


def make_inputs(shape, scale, seed):
    """Random float32 logits for both sides, (..., V). token_divergence has no mask: every
    position is a response token (sd_loss picks the masked positions before the LM head)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    return s, t


def check_values(got, want, rtol, atol, what):
    """Every position against the float64 reference."""
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    assert torch.isfinite(got).all(), what
    diff = (got.double() - want).abs()
    bound = atol + rtol * want.abs()
    if not (diff <= bound).all():
        worst = (diff / want.abs()).max()
        raise AssertionError(f"{what}: max |diff| {diff.max():.3g}, worst rel {worst:.3g}")


# ---------------------------------------------------------------------------------------------
# Values against brute force

SHAPES = [(1, 1, 1), (2, 3, 7), (6, 7), (2, 5, 1000)]  # (B, T, V) and the (N, V) of ChunkedHead


@pytest.mark.parametrize("support, side, tail", SUPPORTS)
@pytest.mark.parametrize("divergence, a", DIVERGENCES)
def test_values_match_brute_force(divergence, a, support, side, tail):
    for seed, shape in enumerate(SHAPES):
        for scale in (1.0, 3.0):
            s, t = make_inputs(shape, scale, seed)
            for k in ks_for(shape[-1]) if support == "topk" else [0]:
                got = token_divergence(s, t, divergence=divergence, support=support, topk=k,
                                       topk_side=side, topk_tail=tail, jsd_alpha=a)
                want = reference(s, t, divergence, a, support, k, side, tail)
                check_values(got, want, 1e-5, 1e-6, f"{shape} scale {scale} k {k}")


@pytest.mark.parametrize("support, side", [("full", "student"), ("topk", "student"), ("topk", "teacher")])
@pytest.mark.parametrize("divergence, a", DIVERGENCES)
def test_large_logits_match_brute_force(divergence, a, support, side):
    """Logits of scale 50–100: near-one-hot distributions, probabilities down to e^-700."""
    for seed, shape in enumerate([(2, 3, 7), (2, 4, 1000)]):
        for scale in (50.0, 100.0):
            s, t = make_inputs(shape, scale, seed)
            for k in ks_for(shape[-1]) if support == "topk" else [0]:
                got = token_divergence(s, t, divergence=divergence, support=support, topk=k,
                                       topk_side=side, jsd_alpha=a)
                want = reference(s, t, divergence, a, support, k, side)
                # float32 log-probabilities of logits ~300 carry absolute errors ~1e-5
                check_values(got, want, 1e-5, 1e-6 * scale, f"{shape} scale {scale} k {k}")


@pytest.mark.parametrize("divergence, side", [("forward", "student"), ("reverse", "teacher")])
def test_tail_bucket_of_a_peaked_distribution(divergence, side):
    """One side puts 1 − 8e-9 of its mass on one token (a logit gap of 20, common in LLMs), the
    other side is uniform. With k = 1 picked by the peaked side, the peaked side's tail log-prob
    is log(4e^-20) ≈ −18.6 and the divergence is 0.8·(log 0.8 + 18.6) − 0.2·log 5 ≈ 14.39."""
    peaked = torch.tensor([[20.0, 0.0, 0.0, 0.0, 0.0]])
    uniform = torch.zeros(1, 5)
    s, t = (peaked, uniform) if side == "student" else (uniform, peaked)
    got = token_divergence(s, t, divergence=divergence, support="topk", topk=1, topk_side=side,
                           topk_tail=True)
    tail = math.log(4 * math.exp(-20) / (1 + 4 * math.exp(-20)))
    want = 0.8 * (math.log(0.8) - tail) + 0.2 * (math.log(0.2) - math.log(1 / (1 + 4 * math.exp(-20))))
    assert abs(reference(s, t, divergence, support="topk", k=1, side=side, tail=True).item() - want) < 1e-9
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("divergence, side", [("forward", "student"), ("reverse", "teacher")])
def test_tail_bucket_with_large_logits(divergence, side):
    s, t = make_inputs((2, 4, 1000), 50.0, seed=1)
    got = token_divergence(s, t, divergence=divergence, support="topk", topk=10,
                           topk_side=side, topk_tail=True)
    want = reference(s, t, divergence, support="topk", k=10, side=side, tail=True)
    check_values(got, want, 1e-5, 1e-4, "tail, scale 50")


def test_tail_bucket_when_k_is_V():
    """Regression: the tail was once 1 − Σ_k p in float32 (cancellation); with k = V it must add
    exactly nothing, and its gradient must stay finite (an empty tail is log 0)."""
    s, t = make_inputs((2, 3, 7), 1.0, seed=1)
    s.requires_grad_(True)
    got = token_divergence(s, t, support="topk", topk=7, topk_tail=True)
    check_values(got.detach(), reference(s.detach(), t), 1e-5, 1e-6, "k = V, tail")
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_sampled_estimator_value():
    """sampled: sg(log S(y) − log T(y))·log S(y) at the sampled token, any shape."""
    for seed, shape in enumerate(SHAPES):
        for scale in (1.0, 3.0, 50.0):
            s, t = make_inputs(shape, scale, seed)
            ids = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(seed))
            got = token_divergence(s, t, divergence="reverse", support="sampled", sampled_ids=ids)
            want = reference(s, t, support="sampled", sampled_ids=ids)
            check_values(got, want, 1e-5, 1e-6 * max(1.0, scale) ** 2, f"{shape} scale {scale}")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("support, side, tail", SUPPORTS)
def test_temperature_divides_both_sides(support, side, tail, temperature):
    s, t = make_inputs((2, 3, 7), 1.0, seed=5)
    for divergence, a in DIVERGENCES:
        got = token_divergence(s, t, divergence=divergence, support=support, topk=3,
                               topk_side=side, topk_tail=tail, jsd_alpha=a, temperature=temperature)
        want = reference(s, t, divergence, a, support, 3, side, tail, temperature=temperature)
        check_values(got, want, 1e-5, 1e-6, f"{divergence} {a}")


def test_one_token_vocabulary_is_zero():
    s, t = make_inputs((2, 3, 1), 5.0, seed=0)
    for divergence, a in DIVERGENCES:
        for support, side, tail in SUPPORTS:
            got = token_divergence(s, t, divergence=divergence, support=support, topk=4,
                                   topk_side=side, topk_tail=tail, jsd_alpha=a)
            assert got.abs().max() < 1e-6, (divergence, a, support, side, tail)


# ---------------------------------------------------------------------------------------------
# Top-k with k = V, chunking, clipping

def student_grad(student_logits, teacher_logits, upstream=None, **kwargs):
    """(values, d Σ upstream·values / d student logits)."""
    s = student_logits.clone().requires_grad_(True)
    values = token_divergence(s, teacher_logits, **kwargs)
    upstream = torch.ones_like(values) if upstream is None else upstream
    (values * upstream).sum().backward()
    return values.detach(), s.grad


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("divergence, a", DIVERGENCES)
def test_topk_with_k_equal_to_V_is_the_full_vocabulary(divergence, a, side, tail):
    for seed, shape in enumerate([(2, 3, 7), (2, 5, 1000)]):
        s, t = make_inputs(shape, 2.0, seed)
        full_values, full_grad = student_grad(s, t, divergence=divergence, jsd_alpha=a)
        for k in (shape[-1], shape[-1] + 5):  # k larger than V is cut to V
            values, grad = student_grad(s, t, divergence=divergence, jsd_alpha=a,
                                        support="topk", topk=k, topk_side=side, topk_tail=tail)
            torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-6)


CHUNK_CASES = [
    dict(divergence="forward"),
    dict(divergence="reverse", support="topk", topk=3, topk_tail=True),
    dict(divergence="jsd", jsd_alpha=0.1, support="topk", topk=4, topk_side="teacher"),
    dict(divergence="reverse", support="sampled"),
]


def median_clip(values):
    """A clip that caps about half of the positive values (clip > 0 switches clipping on), midway
    between two of them, so that rounding differences cannot move a value across it."""
    v = values[values > 0].sort().values
    i = len(v) // 2
    return (v[i] / 2).item() if len(v) < 2 else ((v[i - 1] + v[i]) / 2).item()


def chunked_grad(s, t, upstream, mask, ids, chunk_size, **kwargs):
    """ChunkedHead over the masked positions (as sd_loss runs it), `chunk_size` at a time, with the
    identity as the LM head, so its hidden states are the logits and its input gradient is the
    logits' gradient: (values (N,), d Σ upstream·values / d logits (N, V))."""
    hidden = s[mask].clone().requires_grad_(True)  # (N, V)
    teacher, sampled = t[mask], ids[mask]

    def per_token(student_logits, positions):  # each chunk applies the clip itself
        return token_divergence(student_logits, teacher[positions], sampled_ids=sampled[positions], **kwargs)

    values = ChunkedHead.apply(hidden, torch.eye(s.shape[-1]), per_token, chunk_size)
    (values * upstream[mask]).sum().backward()
    return values.detach(), hidden.grad


@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("shape", [(3, 7, 11), (20, 11), (2, 11)])  # 2 positions < chunk of 3
def test_chunked_equals_unchunked(case, clipped, shape):
    """Chunking lives in ChunkedHead only: chunks of 3 positions give the values and gradients of
    one token_divergence call over all positions."""
    s, t = make_inputs(shape, 2.0, seed=3)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(3))
    upstream = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(4))
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    if len(shape) == 3:  # a (B, T) grid: some positions are not response tokens, one row is empty
        mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(5)) < 0.7
        mask[0] = False
    clip = median_clip(token_divergence(s, t, sampled_ids=ids, **case)) if clipped else 0.0
    whole = student_grad(s, t, upstream, sampled_ids=ids, clip=clip, **case)
    chunked = chunked_grad(s, t, upstream, mask, ids, 3, clip=clip, **case)
    if clipped and mask.sum() > 3:
        assert (whole[0] == clip).any() and (whole[0][mask] < clip).any()  # the cap bites somewhere
    torch.testing.assert_close(chunked[0], whole[0][mask], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], whole[1][mask], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_clip_caps_values_and_stops_their_gradient(case):
    s, t = make_inputs((4, 9, 13), 2.0, seed=7)
    ids = torch.randint(0, 13, (4, 9), generator=torch.Generator().manual_seed(7))
    free_values, free_grad = student_grad(s, t, sampled_ids=ids, **case)
    clip = median_clip(free_values)
    values, grad = student_grad(s, t, sampled_ids=ids, clip=clip, **case)
    capped = free_values > clip
    assert capped.any() and (~capped).any()
    torch.testing.assert_close(values, free_values.clamp(max=clip), rtol=0, atol=0)
    assert (grad[capped] == 0).all(), "a capped token still sends a gradient"
    torch.testing.assert_close(grad[~capped], free_grad[~capped], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Gradients: the student gets the right one, the teacher none

def fd_grad(divergence, a, support, k, side, tail, s, t, eps=1e-6):
    """Central differences of the float64 reference w.r.t. every student logit. Positions are
    independent, so perturbing logit v at all positions at once gives column v of every row."""
    s, t = s.double(), t.double()
    grad = torch.zeros_like(s)
    for v in range(s.shape[-1]):
        step = torch.zeros_like(s)
        step[..., v] = eps
        up = reference(s + step, t, divergence, a, support, k, side, tail)
        down = reference(s - step, t, divergence, a, support, k, side, tail)
        grad[..., v] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("support, side, tail", SUPPORTS)
@pytest.mark.parametrize("divergence, a", DIVERGENCES)
def test_student_gradient_matches_finite_differences(divergence, a, support, side, tail):
    s, t = make_inputs((3, 4, 7), 2.0, seed=11)
    for k in (1, 3, 7) if support == "topk" else [0]:
        _, grad = student_grad(s, t, divergence=divergence, jsd_alpha=a, support=support,
                               topk=k, topk_side=side, topk_tail=tail)
        want = fd_grad(divergence, a, support, k, side, tail, s, t)
        if support == "full" or k > 1 or tail:
            assert grad.abs().sum() > 0  # (renormalised k = 1 is constant 0: zero is right)
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=2e-6)


def test_forward_kl_gradient_is_student_minus_teacher():
    """∂ KL(T‖S) / ∂ z_S = S − T, in float64 by hand, and finite differences agree."""
    s, t = make_inputs((5, 1000), 3.0, seed=2)
    _, grad = student_grad(s, t)
    S, T = (x.double().exp() / x.double().exp().sum(-1, keepdim=True) for x in (s, t))
    torch.testing.assert_close(grad.double(), S - T, rtol=1e-4, atol=1e-7)
    small, teacher = make_inputs((4, 6), 1.0, seed=3)
    _, grad = student_grad(small, teacher)
    torch.testing.assert_close(grad.double(), fd_grad("forward", 0, "full", 0, "", False, small, teacher),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence, a, support, side, tail",  # sampled estimates reverse KL only
                         [d + s for d in DIVERGENCES for s in SUPPORTS]
                         + [("reverse", 0.5, "sampled", "student", False)])
def test_no_gradient_reaches_the_teacher(divergence, a, support, side, tail):
    """Through sd_loss, as the training loop calls it: the teacher's hidden states (here a leaf
    that would accept a gradient) enter only through logits computed under no_grad inside its
    per-token function; the student's hidden states get a non-zero gradient, the teacher's and the
    head's none, with or without the A_t diagnostic. (token_divergence itself does not detach the
    teacher on the full and top-k supports: the caller's no_grad is what stops it.)"""
    g = torch.Generator().manual_seed(13)
    N, d, V = 10, 6, 17
    teacher_h = torch.randn(N, d, generator=g, requires_grad=True)
    weight = torch.randn(V, d, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (N,), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)  # two responses of 5 tokens
    cfg = Config(divergence=divergence, jsd_alpha=a, support=support, topk=5, topk_side=side,
                 topk_tail=tail, chunk_size=4)
    for with_advantage in (False, True):
        student_h = torch.randn(N, d, generator=g, requires_grad=True)
        loss, _ = sd_loss(student_h, teacher_h, weight, ids, mask, mask, 2, cfg, with_advantage)
        loss.backward()
        assert teacher_h.grad is None and weight.grad is None
        assert student_h.grad.abs().sum() > 0


def test_sampled_estimator_detaches_its_coefficient():
    """Even handed a teacher that requires grad, the sampled estimator sends it nothing: its
    coefficient sg(log S(y) − log T(y)) is detached and log S(y) does not involve the teacher."""
    s, t = make_inputs((2, 3, 7), 1.0, seed=0)
    s.requires_grad_(True)
    t.requires_grad_(True)
    ids = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(0))
    token_divergence(s, t, divergence="reverse", support="sampled", sampled_ids=ids).sum().backward()
    assert t.grad is None or (t.grad == 0).all()
    s_logp, t_logp = ref_log_softmax(s.detach().double()), ref_log_softmax(t.detach().double())
    coefficient = (s_logp - t_logp).gather(-1, ids[..., None])  # log S(y) − log T(y), (B, T, 1)
    # ∇_z log S(y) = onehot(y) − S
    want = coefficient * (torch.nn.functional.one_hot(ids, 7) - s_logp.exp())
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-5, atol=1e-7)


def test_sampled_estimator_mean_gradient_is_reverse_kl_gradient():
    """E_{y~S} ∇ [sg(log S(y) − log T(y))·log S(y)] = ∇ KL(S‖T) = S ⊙ (d − KL), d = log S − log T.
    Monte-Carlo over 400k samples on V = 5; tolerance 5 standard errors per logit."""
    g = torch.Generator().manual_seed(21)
    z, w = torch.randn(5, generator=g), torch.randn(5, generator=g)  # student, teacher logits
    n = 400_000
    S = ref_log_softmax(z.double()).exp()
    ys = torch.multinomial(S, n, replacement=True, generator=g)  # y ~ S
    student = z.repeat(n, 1).requires_grad_(True)  # one row per sample: per-sample gradients
    token_divergence(student, w.repeat(n, 1), divergence="reverse", support="sampled",
                     sampled_ids=ys).sum().backward()
    per_sample = student.grad.double()  # (n, V)
    mean, standard_error = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    d = ref_log_softmax(z.double()) - ref_log_softmax(w.double())
    analytic = S * (d - (S * d).sum())
    assert ((mean - analytic).abs() <= 5 * standard_error + 1e-7).all(), (mean, analytic, standard_error)
    assert standard_error.max() < 0.1 * analytic.abs().max()  # the test has power
    _, exact = student_grad(z[None], w[None], divergence="reverse")  # the full reverse KL agrees
    torch.testing.assert_close(exact[0].double(), analytic, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Reductions and the GRPO baseline

def test_sd_loss_reduction_by_hand(monkeypatch):
    """Per-token values set by hand (hidden states 0, an identity head, and a token_divergence
    that returns value[ŷ_t] + logit_0): each sequence's distilled tokens summed and divided by its
    full length, summed over sequences, divided by the step's sequence count; an empty row adds 0."""
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)  # right-aligned
    values = grid[mask]  # (7,) row-major, as masked_scatter fills the grid back
    N, V = len(values), 8
    ids = torch.arange(N)  # ŷ_t = t: the fake reads each position's value through it

    def fake_divergence(student_logits, teacher_logits, divergence, support, topk, topk_side, topk_tail,
                        jsd_alpha, sampled_ids, clip, temperature):
        return values[sampled_ids] + student_logits[:, 0]  # d value / d logit_0 = 1

    monkeypatch.setattr(selfdistill, "token_divergence", fake_divergence)
    for lengths, n_sequences, want_loss, want_grad in [
        ([None] * 4, 4, (2.5 + 0 + 8.5 + 0.5) / 4,
         [[0, 1 / 2, 1 / 2], [0, 0, 0], [0, 1 / 2, 1 / 2], [1 / 3, 1 / 3, 1 / 3]]),
        # the last response distilled through its first token only, still divided by its 3 tokens;
        # a micro-batch of a step with 8 kept sequences
        ([None, None, None, 1], 8, (2.5 + 8.5 + 0.5 / 3) / 8,
         [[0, 1 / 2, 1 / 2], [0, 0, 0], [0, 1 / 2, 1 / 2], [1 / 3, 0, 0]]),
    ]:
        span = contexts.distilled_span(mask, lengths)
        for chunk_size in (1, 3, 64):
            hidden = torch.zeros(N, V, requires_grad=True)
            cfg = Config(chunk_size=chunk_size)
            loss, stats = sd_loss(hidden, torch.zeros(N, V), torch.eye(V), ids, mask, span, n_sequences, cfg)
            assert loss.item() == pytest.approx(want_loss, rel=1e-6)
            loss.backward()
            want = torch.tensor(want_grad)[mask] / n_sequences
            torch.testing.assert_close(hidden.grad[:, 0], want)
            assert (hidden.grad[:, 1:] == 0).all()
            assert stats["tokens"] == int(span.sum())
            assert stats["divergence"] == pytest.approx(float(values[span[mask]].sum()))


SD_CASES = [  # (divergence, a, support, topk, side, tail, clipped, temperature)
    ("forward", 0.5, "full", 0, "student", False, False, 1.0),
    ("forward", 0.5, "full", 0, "student", False, True, 1.0),
    ("reverse", 0.5, "topk", 3, "teacher", True, False, 2.0),
    ("jsd", 0.1, "topk", 4, "student", False, False, 1.0),
    ("reverse", 0.5, "sampled", 0, "student", False, False, 0.5),
]


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 64])
@pytest.mark.parametrize("case", SD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sd_loss_matches_brute_force(case, chunk_size):
    """sd_loss on a micro-batch (a right-aligned (B, T) grid, one row empty, one row's span cut
    short, 6 sequences in the step) against a float64 brute force of the same formula: loss,
    gradient w.r.t. the student's hidden states (autograd through the reference), the per-token
    stats (divergence and entropy summed over the span, token count) and A_t on every token."""
    divergence, a, support, k, side, tail, clipped, temperature = case
    g = torch.Generator().manual_seed(17)
    d, V, n_sequences = 6, 11, 6
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    span = contexts.distilled_span(mask, [2, None, 4, None])
    N = int(mask.sum())
    student_h = torch.randn(N, d, generator=g) * 2
    teacher_h = torch.randn(N, d, generator=g) * 2
    weight = torch.randn(V, d, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)

    # float64 brute force: all logits at once, the reference per token, a Python loop over rows
    h = student_h.double().requires_grad_(True)
    s, t = (h @ weight.double().T) / temperature, (teacher_h.double() @ weight.double().T) / temperature
    if support == "sampled":  # the estimator's surrogate: sg(log S(y) − log T(y))·log S(y)
        s_y = ref_log_softmax(s).gather(-1, ids[:, None])[:, 0]
        t_y = ref_log_softmax(t).gather(-1, ids[:, None])[:, 0]
        per_token = (s_y - t_y).detach() * s_y
    else:
        per_token = reference(s, t, divergence, a, support, k, side, tail)  # (N,)
    clip = median_clip(per_token.detach().float()) if clipped else 0.0
    if clipped:
        per_token = per_token.clamp(max=clip)
    keep = span[mask]  # (N,) distilled or not
    want_loss, start = 0.0, 0
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        want_loss = want_loss + (per_token[start:start + n] * keep[start:start + n]).sum() / max(n, 1)
        start += n
    want_loss = want_loss / n_sequences
    want_loss.backward()
    s_logp = ref_log_softmax(s.detach())
    want_entropy = -(s_logp.exp() * s_logp).sum(-1)
    want_advantage = (ref_log_softmax(t) - s_logp).gather(-1, ids[:, None])[:, 0]

    cfg = Config(divergence=divergence, jsd_alpha=a, support=support, topk=k or 100, topk_side=side,
                 topk_tail=tail, token_clip=clip, logit_temperature=temperature, chunk_size=chunk_size)
    ours_h = student_h.clone().requires_grad_(True)
    loss, stats = sd_loss(ours_h, teacher_h, weight, ids, mask, span, n_sequences, cfg, with_advantage=True)
    loss.backward()
    if clipped:
        assert (per_token == clip).any() and (per_token[keep] < clip).any()  # the clip bites
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    torch.testing.assert_close(ours_h.grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    assert h.grad[~keep].abs().sum() == 0 and (ours_h.grad[~keep] == 0).all()  # outside the span
    assert stats["tokens"] == int(keep.sum())
    assert stats["divergence"] == pytest.approx(per_token[keep].sum().item(), rel=1e-5)
    assert stats["entropy"] == pytest.approx(want_entropy[keep].sum().item(), rel=1e-5)
    torch.testing.assert_close(stats["advantage"].double(), want_advantage.detach(), rtol=1e-4, atol=1e-5)
    # the diagnostic changes nothing: the same loss without it, and no A_t
    again, plain = sd_loss(student_h, teacher_h, weight, ids, mask, span, n_sequences, cfg)
    assert again.item() == loss.item() and (plain["advantage"] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_grpo_loss_matches_brute_force(chunk_size):
    """grpo_loss: −A_i·log π_θ(ŷ_t) over the micro-batch's tokens / the step's token count, against
    float64 autograd; its entropy stat is summed over every token."""
    g = torch.Generator().manual_seed(19)
    d, V, n_tokens = 5, 9, 20
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    N = int(mask.sum())
    student_h = torch.randn(N, d, generator=g) * 2
    weight = torch.randn(V, d, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    advantages = torch.tensor([1.5, -0.5, 2.0])
    h = student_h.double().requires_grad_(True)
    logp = ref_log_softmax((h @ weight.double().T) / 2.0)  # logit_temperature 2
    rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]  # (N,) the row of each token
    want = -(advantages.double()[rows] * logp.gather(-1, ids[:, None])[:, 0]).sum() / n_tokens
    want.backward()
    cfg = Config(arm="grpo", logit_temperature=2.0, chunk_size=chunk_size)
    ours_h = student_h.clone().requires_grad_(True)
    loss, stats = selfdistill.grpo_loss(ours_h, weight, ids, advantages, mask, n_tokens, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(ours_h.grad.double(), h.grad, rtol=1e-4, atol=1e-6)
    assert stats["tokens"] == N
    assert stats["entropy"] == pytest.approx(-(logp.exp() * logp).sum().item(), rel=1e-5)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    for eps in (1e-6, 0.1):
        advantages, zero_variance = grpo_advantages(rewards, eps=eps)
        assert zero_variance == 2
        # row 0: mean 1/4, Bessel variance (3/4² + 3·1/4²)/3 = 1/4, std 1/2
        # row 3: mean 1/2, Bessel variance 4·(1/2)²/3 = 1/3
        row0 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + eps)
        row3 = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (math.sqrt(1 / 3) + eps)
        want = torch.stack([row0, torch.zeros(4), torch.zeros(4), row3])  # flat groups: 0 / (0 + ε)
        torch.testing.assert_close(advantages, want)
    advantages, zero_variance = grpo_advantages(torch.tensor([[0.0, 1.0]]))
    assert zero_variance == 0 and advantages[0, 1].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6))


def test_policy_gradient_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = policy_gradient_loss(logp, advantages, mask, divisor=10)
    # −(2·(−1 − 2) + (−1)·(−0.5 − 0.25 − 4)) / 10 = −(−6 + 4.75) / 10
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))


# ---------------------------------------------------------------------------------------------
# ChunkedHead: chunk by chunk equals all at once

def head_inputs(N=10, d=8, V=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, d, generator=g), torch.randn(N, d, generator=g),
            torch.randn(V, d, generator=g) / math.sqrt(d), torch.randn(N, generator=g))


def forward_kl_per_token(teacher_h, weight, **kwargs):
    def per_token(student_logits, positions):  # (C, V) → (C,), a fixed teacher as the target
        with torch.no_grad():
            teacher_logits = teacher_h[positions] @ weight.T
        return token_divergence(student_logits, teacher_logits, **kwargs)
    return per_token


@pytest.mark.parametrize("kwargs", [dict(), dict(clip=True),
                                    dict(divergence="reverse", support="topk", topk=5)],
                         ids=["forward", "forward-clip", "reverse-topk"])
@pytest.mark.parametrize("chunk_size", [0, 1, 3, 4, 10, 64])
def test_chunked_head_equals_naive(chunk_size, kwargs):
    student_h, teacher_h, weight, upstream = head_inputs()
    if kwargs.get("clip"):
        unclipped = forward_kl_per_token(teacher_h, weight)(student_h @ weight.T, slice(0, 10))
        kwargs = dict(kwargs, clip=median_clip(unclipped))
    per_token = forward_kl_per_token(teacher_h, weight, **kwargs)
    naive_h = student_h.clone().requires_grad_(True)
    naive = per_token(naive_h @ weight.T, slice(0, naive_h.shape[0]))  # every position's logits at once
    (naive * upstream).sum().backward()
    ours_h = student_h.clone().requires_grad_(True)
    ours = ChunkedHead.apply(ours_h, weight, per_token, chunk_size)
    (ours * upstream).sum().backward()
    if "clip" in kwargs:
        assert (naive == kwargs["clip"]).any()
    torch.testing.assert_close(ours, naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=1e-5, atol=1e-6)


def test_auto_chunk_from_the_memory_budget(monkeypatch):
    """chunk_size=0 takes the most positions whose (C, V) float32 logits fit in CHUNK_LOGITS_MB (at
    least 1); an explicit chunk_size is kept as given; ChunkedHead runs the chunks it says, and the
    result equals brute force."""
    budget = chunked_head.CHUNK_LOGITS_MB * 2 ** 20
    for V in (111, 8192, 151_936, 262_144):
        C = chunked_head.chunk_positions(0, V)
        assert C * V * 4 <= budget < (C + 1) * V * 4
        assert chunked_head.chunk_positions(7, V) == 7
    assert chunked_head.chunk_positions(0, 151_936) == 193  # Qwen3's head: the figure in the docstring
    assert chunked_head.chunk_positions(0, budget) == 1  # a row of logits over the budget: one position
    student_h, teacher_h, weight, upstream = head_inputs()  # 10 positions, V = weight.shape[0]
    monkeypatch.setattr(chunked_head, "CHUNK_LOGITS_MB", 3.5 * 4 * weight.shape[0] / 2 ** 20)  # 3 rows
    seen = []
    per_token = forward_kl_per_token(teacher_h, weight)

    def recording(student_logits, positions):
        seen.append((positions.start, positions.stop))
        return per_token(student_logits, positions)
    naive_h = student_h.clone().requires_grad_(True)
    naive = per_token(naive_h @ weight.T, slice(0, 10))
    (naive * upstream).sum().backward()
    ours_h = student_h.clone().requires_grad_(True)
    ours = ChunkedHead.apply(ours_h, weight, recording, 0)
    (ours * upstream).sum().backward()
    assert seen == [(0, 3), (3, 6), (6, 9), (9, 10)]
    torch.testing.assert_close(ours, naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=1e-5, atol=1e-6)


def test_chunked_head_under_no_grad():
    student_h, teacher_h, weight, _ = head_inputs(N=7)
    per_token = forward_kl_per_token(teacher_h, weight)
    want = per_token(student_h @ weight.T, slice(0, 7))
    for h in (student_h, student_h.clone().requires_grad_(True)):
        with torch.no_grad():
            values = ChunkedHead.apply(h, weight, per_token, 3)
        assert not values.requires_grad
        torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-6)
    values = ChunkedHead.apply(student_h, weight, per_token, 3)  # no grad wanted: values only
    assert not values.requires_grad
    torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-6)
