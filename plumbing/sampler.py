"""The one sampler: `generate` samples the training rollouts, the evaluation's answers, the toy
build's filter and the HF critic's critiques. Its decoding loop `decode` draws what HF's
`model.generate` would draw from the same seed (tests/test_train.py compares them), but lets
finished rows leave the batch, reads each distinct prompt once and writes the KV cache into
buffers (docs/performance.md). Settings `decode` does not apply (`hf_only_settings`) and the
toy build's static cache go through HF's own loop.
"""
import inspect

import torch

def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def sampling_config(tokenizer, stop, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                    static_cache=False):
    """temperature 0 = greedy. A static KV cache helps big batches of a tiny model on CPU (the
    default dynamic cache's concatenations made batches of 1024 rows 4x slower there)."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) \
        if temperature > 0 else dict(do_sample=False)
    return GenerationConfig(**sampling, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
                            use_cache=True, remove_invalid_values=True,
                            **({"cache_implementation": "static"} if static_cache else {}))


def growing_cache(model, capacity):
    """HF's dynamic KV cache with its full-attention layers writing into buffers of `capacity`
    positions, allocated once, instead of concatenating the whole cache at every token (a copy that
    grows with the length: 3-5 % of a toy evaluation). Attention reads the filled part, the very
    values the concatenation would hold, so the samples are bit-identical (tested); other layer
    kinds (sliding windows) keep HF's own class."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            B, H, _, D = key_states.shape
            self.key_buffer = key_states.new_empty(B, H, capacity, D)
            self.value_buffer = value_states.new_empty(B, H, capacity, value_states.shape[-1])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions overflowed ({end})")
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices):  # rows leave the batch: one copy of what is kept
            end = self.get_seq_length()
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


MIN_ROWS = 8  # the batch shrinks only while this many rows remain: matmuls of 1-3 rows take other
# kernels (gemv) on CPU whose last bits differ from the same rows in a batch


def warpers(temperature, top_p, top_k):
    """HF generate's logit processors for our sampling settings, in its order (so that the loop
    below draws what model.generate would): inf/NaN removal, temperature, top-k, top-p."""
    from transformers import (InfNanRemoveLogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)
    steps = [InfNanRemoveLogitsProcessor()]
    if temperature > 0:
        steps += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        steps += [TopKLogitsWarper(top_k)] if top_k else []
        steps += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList(steps)


# generation_config fields that decode honours (or that do not change what is sampled)
PLAIN_FIELDS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "eos_token_id",
                "pad_token_id", "bos_token_id", "use_cache", "remove_invalid_values", "transformers_version",
                "_from_model_config", "output_attentions", "output_hidden_states", "return_dict_in_generate"}


def hf_only_settings(model):
    """Settings in the model's generation_config that HF's generate merges into every call and
    decode does not apply (repetition penalty, min_new_tokens, bad words, ...). A model with any
    samples with HF's loop instead, so that it samples as it would anywhere else."""
    return sorted(set(model.generation_config.to_diff_dict()) - PLAIN_FIELDS)


def decode(model, input_ids, attention_mask, max_new_tokens, warp, stop, pad_id, greedy=False):
    """One chunk's decoding loop, written out so that finished rows leave the batch (HF generate
    runs every row until the last one stops: half the work of a toy evaluation went to rows that
    had ended) and each distinct prompt is read once. (B, L) left-padded prompts → (B,
    max_new_tokens) new ids, pad after a stop id.

    Each step draws one Exp(1) variable per (row, token) for the whole chunk, whether a row still
    runs or not, and samples argmax p / q (the exponential race: P(token) = p, as torch.multinomial
    draws one sample). So a row's tokens do not depend on when other rows stop, and they are the
    tokens model.generate samples from the same seed (tested), up to the last bits of matmuls
    over fewer rows, which are equal on CPU from MIN_ROWS rows up."""
    B, L = input_ids.shape
    device = input_ids.device
    stop = torch.tensor(sorted(stop), device=device)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # left padding
    cache = growing_cache(model, L + max_new_tokens)
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(body.forward).parameters else {}
    rows = torch.arange(B, device=device)  # which of the chunk's rows the batch holds
    # The prompt pass once per distinct prompt (eval's 12 samples of a question, GRPO's G copies);
    # its cache and last logits are then copied to every row with that prompt.
    distinct, copies = torch.unique(torch.cat([input_ids, attention_mask], -1), dim=0, return_inverse=True)
    shared = MIN_ROWS <= len(distinct) < B
    first = torch.zeros(len(distinct), dtype=torch.long, device=device).scatter_(0, copies, rows) if shared else rows
    logits = model(input_ids=input_ids[first], attention_mask=attention_mask[first], position_ids=positions[first],
                   cache=cache, use_cache=True, **last).logits[:, -1]
    if shared:
        logits = logits[copies]
        cache.batch_select_indices(copies)
    new_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)  # per batch row: no stop id yet
    for t in range(max_new_tokens):
        scores = warp(None, logits.float())  # (b, V)
        if greedy:
            next_ids = scores.argmax(-1)
        else:
            draws = torch.empty(B, scores.shape[-1], device=device).exponential_()  # (B, V)
            next_ids = (scores.softmax(-1) / draws[rows]).argmax(-1)  # (b,)
        new_ids[rows, t] = torch.where(running, next_ids, pad_id)
        running &= ~torch.isin(next_ids, stop)
        left = int(running.sum())
        if left == 0 or t == max_new_tokens - 1:
            break
        if MIN_ROWS <= left <= len(rows) // 2:  # at most one shrink per halving: each copies the cache
            keep = running.nonzero().flatten()
            rows, running, next_ids = rows[keep], running[keep], next_ids[keep]
            attention_mask, positions = attention_mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=positions,
                       cache=cache, use_cache=True, **last).logits[:, -1]
    return new_ids


@torch.inference_mode()  # no_grad's numbers without autograd's bookkeeping: 3-8 % off a toy evaluation
def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             batch_size=256, static_cache=False, stop=None, seed=None, first=0):
    """Sample one response per prompt (lists of ids): KV cache on, left padding, eval mode.
    Returns (responses, truncated): ids up to and including the first stop id; truncated = none.
    seed: the chunk of prompts that starts at row i (counted from `first`) is sampled after
    torch.manual_seed(seed + (i << 32)), so a chunk's samples do not depend on the chunks before
    it, nor on which process drew them; None continues the current random stream."""
    stop = stop or eos_ids(model, tokenizer)
    gen = sampling_config(tokenizer, stop, max_new_tokens, temperature, top_p, top_k, static_cache)
    warp, hf_loop = warpers(temperature, top_p, top_k), bool(hf_only_settings(model))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, truncated = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        if seed is not None:
            torch.manual_seed(seed + ((first + i) << 32))
        L = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), L), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, p in enumerate(batch):
            input_ids[b, L - len(p):] = torch.tensor(p)
            attention_mask[b, L - len(p):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if static_cache or hf_loop:  # the toy build, which must not change, or settings decode lacks
            new_ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)[:, L:]
        else:
            new_ids = decode(model, input_ids, attention_mask, max_new_tokens, warp, stop,
                             tokenizer.pad_token_id, greedy=temperature == 0)
        batch_responses, batch_truncated = cut_at_stop(new_ids, stop)
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
