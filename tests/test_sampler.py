"""Protects the one sampler (plumbing/sampler.py): generate cuts each response at its first stop
token; its decoding loop draws what Hugging Face's model.generate draws, token for token, while
finished rows leave the batch; a model whose generation settings our loop does not implement is
sampled by model.generate itself; the growing KV cache gives the dynamic cache's logits bit for
bit."""
import pytest
import torch

from plumbing import sampler


def hf_samples(model, tok, prompts, batch_size, max_new_tokens, stop, temperature=1.0, top_p=1.0, top_k=0):
    """model.generate (HF's own loop) chunk by chunk on left-padded prompts, each row cut after its
    first stop id by a Python scan: [(ids, truncated)], what sampler.generate must return."""
    samples = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        L = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in batch])
        mask = (torch.arange(L) >= L - torch.tensor([len(p) for p in batch])[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=sampler.sampling_config(
            tok, set(stop), max_new_tokens, temperature, top_p, top_k))
        for row in out[:, L:].tolist():
            end = next((j for j, t in enumerate(row) if t in stop), None)
            samples.append((row if end is None else row[:end + 1], end is None))
    return samples


def test_generate_cuts_each_response_at_its_first_stop_token(tiny):
    import copy
    model, tok = tiny
    model = copy.deepcopy(model)  # the session's model keeps its own EOS
    stop = list(range(4, 10))  # several stop ids: some rows end early, some run to the limit
    model.generation_config.eos_token_id = stop
    prompts = [tok("1+2=")["input_ids"], tok("9+9=")["input_ids"][:2]] * 6  # two lengths: left padding
    torch.manual_seed(0)
    responses, truncated = sampler.generate(model, tok, prompts, 6, temperature=1.0, batch_size=5)
    torch.manual_seed(0)  # brute force: the same sampling, raw rows cut by a Python scan
    assert list(zip(responses, truncated)) == hf_samples(model, tok, prompts, 5, 6, stop)
    assert any(truncated) and not all(truncated)
    for r, t in zip(responses, truncated):
        assert not any(x in stop for x in r[:-1])  # no stop token before the last
        assert t == (r[-1] not in stop) and (not t or len(r) == 6)


@pytest.mark.parametrize("top_p,top_k,temperature", [(1.0, 0, 1.0), (0.9, 5, 0.7), (1.0, 0, 0.0)])
def test_decode_draws_what_hf_generate_draws_while_the_batch_shrinks(tiny, top_p, top_k, temperature,
                                                                      monkeypatch):
    """sampler.decode reads each distinct prompt once and drops finished rows from the batch
    (48-row chunks of prompts 4 times each, 16 stop ids: rows end at many steps) yet samples
    exactly what model.generate samples from the same seed, chunk after chunk of one random
    stream, with top-p/top-k and temperature, and greedy."""
    import copy
    from transformers import DynamicCache
    model, tok = tiny
    model = copy.deepcopy(model)
    stop = list(range(4, 20))
    model.generation_config.eos_token_id = stop
    prompts = [tok(f"{i}+{i * 7 % 13}=")["input_ids"][:3 + i % 3] for i in range(15) for _ in range(4)]
    selects, select = [], DynamicCache.batch_select_indices  # 12 distinct prompts, then 3
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda cache, keep: (selects.append(len(keep)), select(cache, keep))[1])
    torch.manual_seed(3)
    responses, truncated = sampler.generate(model, tok, prompts, 10, temperature, top_p, top_k, batch_size=48)
    torch.manual_seed(3)
    assert list(zip(responses, truncated)) == hf_samples(model, tok, prompts, 48, 10, stop, temperature, top_p, top_k)
    assert selects[0] == 48  # 12 prompt passes copied to 48 rows (3 distinct prompts: too few)
    if temperature > 0:
        shrinks = selects[1:]
        assert shrinks and all(sampler.MIN_ROWS <= n <= 24 for n in shrinks)  # the batch did shrink
        assert any(truncated) and not all(truncated)


def test_a_model_with_other_generation_settings_samples_with_hf_generate(tiny, monkeypatch):
    """A repetition penalty or min_new_tokens in the model's generation_config (HF merges them
    into every generate call) sends sampling to HF's loop, which applies them; decode is not used."""
    import copy
    model, tok = tiny
    plain = sampler.hf_only_settings(model)
    model = copy.deepcopy(model)
    model.generation_config.update(repetition_penalty=1.5, min_new_tokens=5)
    assert plain == [] and sampler.hf_only_settings(model) == ["min_new_tokens", "repetition_penalty"]
    monkeypatch.setattr(sampler, "decode", lambda *a, **k: pytest.fail("decode ignores these settings"))
    prompts = [tok("1+2=")["input_ids"]] * 3 + [tok("9+9")["input_ids"]] * 3
    torch.manual_seed(0)
    responses, truncated = sampler.generate(model, tok, prompts, 8, temperature=1.0, batch_size=6)
    assert all(len(r) >= 5 for r in responses)  # min_new_tokens applied
    torch.manual_seed(0)
    assert list(zip(responses, truncated)) == hf_samples(model, tok, prompts, 6, 8, sampler.eos_ids(model, tok))


def test_growing_cache_gives_the_dynamic_caches_logits_bit_for_bit(tiny):
    """sampler.growing_cache writes keys and values into buffers instead of concatenating: every
    step's logits must equal those of HF's default dynamic cache exactly (left-padded rows, greedy
    so both runs see the same tokens), and the cache must really live in its buffers."""
    model, tok = tiny
    prompts = [tok("1+2=")["input_ids"], tok("9+9=3")["input_ids"][:2], tok("45+1")["input_ids"]]
    L, new_tokens = max(map(len, prompts)), 12
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    gen = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
               min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        plain = model.generate(**gen)
        cache = sampler.growing_cache(model, L + new_tokens)
        grown = model.generate(**gen, cache=cache)
    assert torch.equal(plain.sequences, grown.sequences)
    assert len(grown.logits) == new_tokens
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, grown.logits))
    layer = cache.layers[0]
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr() and layer.keys.shape[-2] == L + new_tokens - 1
    with pytest.raises(RuntimeError, match="overflowed"), torch.inference_mode():
        model.generate(**gen, cache=sampler.growing_cache(model, L + new_tokens - 2))
