import pytest
import torch

from llmstack.config import ModelConfig, RopeScaling, load_config, CONFIGS_DIR
from llmstack.model import Llama


def small(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def test_logits_shape_and_loss_matches_logits():
    torch.manual_seed(0)
    model = Llama(small())
    x = torch.randint(0, 97, (3, 17))
    y = torch.randint(0, 97, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 97)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), y.reshape(-1))
    torch.testing.assert_close(model(x, y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_causality_output_at_t_ignores_later_tokens(kv_heads, tied):
    torch.manual_seed(0)
    model = Llama(small(n_kv_heads=kv_heads, tie_embeddings=tied)).eval()
    x = torch.randint(0, 97, (2, 20))
    t = 11
    changed = x.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4  # later positions do see the change


def test_llama2_7b_param_count():
    cfg = load_config(CONFIGS_DIR / "model" / "7b.yaml")
    with torch.device("meta"):
        model = Llama(cfg.model)
    assert model.num_params() == 6_738_415_616


def test_tied_embeddings_share_storage_and_flops():
    model = Llama(small(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    untied = Llama(small())
    assert untied.num_params() - model.num_params() == 97 * 64
    # 6N (+ the attention term), input embedding excluded when untied
    n = untied.num_params() - 97 * 64
    assert untied.flops_per_token(32) == 6 * n + 12 * 2 * 64 * 32


def test_rope_scaling_changes_only_low_frequencies():
    from llmstack.model import rope_tables
    plain = small(max_seq_len=64, rope_theta=500000.0, dim=256, n_heads=2, n_kv_heads=2)
    scaled = small(max_seq_len=64, rope_theta=500000.0, dim=256, n_heads=2, n_kv_heads=2,
                   rope_scaling=RopeScaling(factor=8.0, original_max_position=64))
    _, sin_a = rope_tables(plain)
    _, sin_b = rope_tables(scaled)
    torch.testing.assert_close(sin_a[:, :4], sin_b[:, :4])  # high frequencies untouched
    ratio = sin_a[-1, -1] / sin_b[-1, -1]  # lowest frequency: slowed down by the factor
    assert abs(ratio.item() - 8.0) < 0.05


def test_doc_ids_block_attention_across_documents():
    torch.manual_seed(0)
    model = Llama(small()).eval()
    x = torch.randint(0, 97, (1, 16))
    doc = torch.tensor([[0] * 8 + [1] * 8])
    pos = torch.tensor([list(range(8)) * 2])
    with torch.no_grad():
        packed = model(x, doc_ids=doc, position_ids=pos)
        second_alone = model(x[:, 8:])
    torch.testing.assert_close(packed[:, 8:], second_alone, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = Llama(small())
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    model(x, y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, y).backward()
    for a, b in zip(ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)
