"""HF exports carry their generation settings and a tokenizer both transformers lines load.

- generation_config.json: eos ids including the chat turn end (<|im_end|>), bos, pad, greedy, a
  bounded max_new_tokens; config.json keeps the eos list; the tokenizer's model_max_length is the
  model's context. Proven with transformers' own `generate`: a chat model stops at <|im_end|>.
- tokenizer_config.json names PreTrainedTokenizerFast, so transformers 4.45 (the oldest pyproject
  allows, in its own environment: tests/compat_venv.py) loads the tokenizer and the model, encodes
  and templates like 5.x, and its `generate` stops at the same token."""
from __future__ import annotations

import json

import pytest
import torch

from llmstack.data import Tokenizer
from llmstack.generate import generate_uncached_greedy
from llmstack.hf import export_hf
from llmstack.pretrained import load_pretrained
from tests import compat_venv
from tests.helpers import TEST_DATA_DIR, tiny_config
from tests.test_hf_data import example_dir

CHAT = [{"role": "user", "content": "Alice has 2 pens and finds 3 more. How many pens now?"}]


def chat_model_that_ends_its_turn():
    """The example chat model (ChatML tokenizer) with two LM-head rows swapped so that its greedy
    answer to CHAT is a few tokens followed by <|im_end|>, as a fine-tuned chat model's is.
    Returns (pretrained, prompt ids, expected answer ids ending with <|im_end|>)."""
    pre = load_pretrained(example_dir() / "tiny-llama")
    tok = pre.tokenizer._tok
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    prompt = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    greedy = generate_uncached_greedy(pre.model, prompt, 8)
    j = next(i for i in range(2, 8) if greedy[i] not in greedy[:i] + [im_end, eos])
    assert im_end not in greedy[:j] and eos not in greedy[:j]
    with torch.no_grad():  # step j's argmax becomes <|im_end|>; earlier steps keep theirs
        w = pre.model.output.weight
        w[[greedy[j], im_end]] = w[[im_end, greedy[j]]]
    assert generate_uncached_greedy(pre.model, prompt, j + 1) == greedy[:j] + [im_end]
    return pre, prompt, greedy[:j] + [im_end]


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    pre, prompt, answer = chat_model_that_ends_its_turn()
    out = export_hf(pre.model, pre.cfg, pre.tokenizer, tmp_path_factory.mktemp("chat") / "hf")
    return out, pre, prompt, answer


def test_generation_settings_are_exported(chat_export):
    out, pre, _, _ = chat_export
    tok = pre.tokenizer._tok
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"eos_token_id": eos, "pad_token_id": tok.pad_token_id, "do_sample": False, "max_new_tokens": 256}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == eos and cfg["pad_token_id"] == tok.pad_token_id and cfg["bos_token_id"] is None
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["model_max_length"] == pre.cfg.model.max_seq_len == 256
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_end|>" in tc["additional_special_tokens"]
    assert tc["chat_template"] == tok.chat_template


def test_transformers_generate_stops_at_the_turn_end(chat_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    out, _, prompt, answer = chat_export
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length == 256
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == prompt
    ids = torch.tensor([prompt])
    got = model.generate(ids, attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
    assert got == answer  # greedy, token-identical to llmstack, stopped at <|im_end|>
    # with the eos alone (what the export wrote before) it runs past the turn end
    past = model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=tok.eos_token_id,
                          max_new_tokens=len(answer) + 3)[0, len(prompt):].tolist()
    assert past[:len(answer)] == answer and len(past) == len(answer) + 3
    chat = pipeline("text-generation", model=str(out))(CHAT)[0]["generated_text"]
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"] == tok.decode(answer, skip_special_tokens=True)


# --- transformers 4.45 -----------------------------------------------------------------------------

TRANSFORMERS_445 = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
res = {"transformers": transformers.__version__}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    r = {"class": type(tok).__name__, "eos": tok.eos_token, "pad": tok.pad_token, "max_len": tok.model_max_length,
         "specials": tok.additional_special_tokens, "encode": tok.encode("def f(x):\n    return x + 1  Alice has 3 pens.",
                                                                          add_special_tokens=False)}
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if tok.chat_template:
        text = tok.apply_chat_template(json.loads(open(folder + "/chat.json").read()), tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        r["prompt"] = ids[0].tolist()
        r["answer"] = model.generate(ids, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    ids = torch.tensor([r["encode"]])
    with torch.no_grad():
        r["logits"] = model(input_ids=ids).logits[0, -1].tolist()
    res[folder] = r
print(json.dumps(res))
"""


@pytest.mark.slow
def test_transformers_445_loads_exported_tokenizers_and_models(chat_export, tmp_path):
    from transformers import AutoTokenizer
    out, _, prompt, answer = chat_export
    (out / "chat.json").write_text(json.dumps(CHAT))
    cfg = tiny_config(tmp_path)  # our own BPE tokenizer (no chat template) on a tiny llmstack model
    from llmstack.model import Llama
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    bpe = Tokenizer("bpe", TEST_DATA_DIR / "bpe512-max120" / "tokenizer.json")
    bpe_out = export_hf(model, cfg, bpe, tmp_path / "bpe")
    res = compat_venv.run_script("transformers-4.45", TRANSFORMERS_445, str(out), str(bpe_out))
    assert res["transformers"].startswith("4.45")
    text = "def f(x):\n    return x + 1  Alice has 3 pens."
    diffs = {}
    for folder, reference in [(out, load_pretrained(out)), (bpe_out, None)]:
        r = res[str(folder)]
        new = AutoTokenizer.from_pretrained(str(folder))  # transformers 5 reads the same files the same way
        assert r["class"] == "PreTrainedTokenizerFast" and r["eos"] == new.eos_token and r["pad"] == new.pad_token
        assert r["encode"] == new.encode(text, add_special_tokens=False)
        assert r["max_len"] == 256 if folder == out else r["max_len"] == cfg.model.max_seq_len
        with torch.no_grad():
            ours = (reference.model if reference else model)(torch.tensor([r["encode"]]))[0, -1]
        diffs[folder.name] = (torch.tensor(r["logits"]) - ours).abs().max().item()
        assert diffs[folder.name] <= 1e-4
    chat = res[str(out)]
    assert "<|im_end|>" in chat["specials"] and chat["prompt"] == prompt
    assert chat["answer"] == answer  # 4.45's generate stops at <|im_end|> too
    assert bpe.encode(text) == res[str(bpe_out)]["encode"]
    print(json.dumps({"transformers": res["transformers"], "max_logit_diff": diffs}))
