"""KV-cache generation: cached == uncached greedy, batching with ragged prompts, sampling, errors."""
import pytest
import torch

from llmstack.generate import GenerationError, generate, generate_uncached_greedy, sample_next
from llmstack.model import Llama
from tests.helpers import tiny_config


def _model(tmp_path, **extra):
    cfg = tiny_config(tmp_path, **extra)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    with torch.no_grad():  # larger weights than the init: peaked logits, so argmax is not a near-tie
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [42], [300, 301, 302, 11], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1]]


def test_cached_equals_uncached_greedy_single(tmp_path):
    model = _model(tmp_path)
    for p in PROMPTS:
        out = generate(model, [p], max_new_tokens=12)
        assert out.tokens[0] == generate_uncached_greedy(model, p, 12)


def test_cached_equals_uncached_greedy_batched_ragged(tmp_path):
    model = _model(tmp_path)
    out = generate(model, PROMPTS, max_new_tokens=12)
    for p, toks in zip(PROMPTS, out.tokens):
        assert toks == generate_uncached_greedy(model, p, 12), p
    assert out.tokens_per_s > 0 and out.prefill_s > 0 and out.decode_s > 0


def test_gqa_and_mha_models(tmp_path):
    model = _model(tmp_path, **{"model.n_kv_heads": 4})
    out = generate(model, PROMPTS[:2], max_new_tokens=6)
    assert out.tokens[0] == generate_uncached_greedy(model, PROMPTS[0], 6)


def test_stop_tokens_and_max_new_tokens(tmp_path):
    model = _model(tmp_path)
    ref = generate_uncached_greedy(model, PROMPTS[0], 10)
    stop = ref[3]
    first = ref.index(stop)
    out = generate(model, [PROMPTS[0], PROMPTS[2]], max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == ref[:first]  # stop token excluded
    assert len(out.tokens[1]) <= 10
    out = generate(model, [PROMPTS[1]], max_new_tokens=3)
    assert len(out.tokens[0]) == 3


def test_sampling_deterministic_under_seed(tmp_path):
    model = _model(tmp_path)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, PROMPTS, seed=123, **kw).tokens
    b = generate(model, PROMPTS, seed=123, **kw).tokens
    c = generate(model, PROMPTS, seed=124, **kw).tokens
    assert a == b
    assert a != c


def test_top_k_one_is_greedy_and_top_p_keeps_nucleus():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, temperature=1.0, top_k=1, top_p=None, generator=g).tolist() == [1, 2]
    # top_p tiny: only the single most likely token survives
    for _ in range(20):
        assert sample_next(logits, temperature=1.0, top_k=None, top_p=1e-3, generator=g).tolist() == [1, 2]
    # top_k=2 never samples outside the two largest
    seen = {int(sample_next(logits[:1], temperature=5.0, top_k=2, top_p=None, generator=g)) for _ in range(200)}
    assert seen == {1, 2}


def test_prompt_too_long_is_one_line_error(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(GenerationError, match="exceeds the model's context of 128") as e:
        generate(model, [[1] * 120], max_new_tokens=20)
    assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match="at least one token"):
        generate(model, [[]], max_new_tokens=2)
