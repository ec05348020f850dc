"""The LM head, applied by us, at the response positions only: the transformer body's hidden states
there (`response_hidden`), then the head and a per-token function chunk by chunk over positions, so
no (T, V) tensor is ever held (the memory rule: Qwen3's V = 151,936 at 2,048 positions is
1.2 GB per float32 tensor). `ChunkedHead` takes each chunk's gradient w.r.t. the hidden states right
there (one extra matmul), so nothing of size V outlives its chunk and nothing is recomputed in the
backward pass; the losses in selfdistill.py run on it. Results equal the unchunked computation
(tests/test_divergence.py).
"""
import torch

# ---------------------------------------------------------------------------------------------
# Chunks of positions, and the autograd function that runs the head over them.

CHUNK_LOGITS_MB = 112  # chunk_size=0: one chunk's (C, V) float32 logits take at most this many MiB


def chunk_positions(chunk_size, vocab_size):
    """Positions per chunk: chunk_size, or for 0 the most whose (C, V) float32 logits fit in
    CHUNK_LOGITS_MB. A chunk holds about eight tensors of that size at once: at Qwen3's V = 151,936,
    193 positions and ≈ 0.9 GB; at the toy's V = 111, a whole micro-batch in one chunk. The LM head's
    matmuls run faster on more rows (docs/performance.md)."""
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


# ---------------------------------------------------------------------------------------------
# The hidden states at the response positions, and log-probabilities of given tokens from them.

def response_hidden(model, rows, T, device):
    """The transformer body's final hidden states at the T positions that predict the response
    tokens: (B, T, d). The LM head is applied later, chunk by chunk (never to prompt positions)."""
    body = model.get_base_model().get_decoder()
    out = body(input_ids=rows["input_ids"].to(device), attention_mask=rows["attention_mask"].to(device),
               position_ids=rows["position_ids"].to(device), use_cache=False)
    return out.last_hidden_state[:, -T - 1:-1]


def token_log_probs(hidden, weight, ids, chunk_size, temperature=1.0):
    """log softmax(h·Wᵀ / temperature)[ŷ_t] for each position: hidden (N, d), ids (N,) → (N,),
    `chunk_size` positions at a time, so no (N, V) tensor is held (the memory rule above)."""
    return torch.cat([(hidden[j:j + chunk_size] @ weight.T).float().div(temperature).log_softmax(-1)
                      .gather(-1, ids[j:j + chunk_size, None]).squeeze(-1)
                      for j in range(0, len(ids), chunk_size)])
