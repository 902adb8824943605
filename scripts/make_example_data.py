"""Write the example data the recipes use, locally and deterministically (nothing is downloaded):

  <out>/tiny-llama/     a tiny random LlamaForCausalLM (safetensors) with a BPE tokenizer that has
                        a ChatML chat template (<|im_start|>, <|im_end|>) and eos <|endoftext|>
  <out>/corpus.jsonl    plain-text documents {"text": ...} for continued pretraining
  <out>/chat.jsonl      conversations {"messages": [{role, content}, ...]} for SFT / LoRA
  <out>/eval.txt        held-out text for `llmstack eval --text-file`

The text is generated from small templates (arithmetic stories and Q&A) with a seeded RNG, so
a tiny model learns it within a few dozen steps on a CPU.

    python scripts/make_example_data.py [--out data/examples]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
THINGS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles"]
# the model block of the recipes must equal this (configs/recipes/*.yaml)
MODEL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    lines = [f"{a} has {x} {thing}.", f"{b} gives {a} {y} more {thing}.", f"Now {a} has {x + y} {thing}."]
    if rng.random() < 0.5:
        z = rng.randint(1, x + y)
        lines += [f"{a} gives {z} {thing} to {b}.", f"Now {a} has {x + y - z} {thing}."]
    return " ".join(lines)


def conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a careful assistant who counts things."}] if rng.random() < 0.5 else []
    for _ in range(rng.choice([1, 1, 2])):
        a, thing = rng.choice(NAMES), rng.choice(THINGS)
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        msgs.append({"role": "user", "content": f"{a} has {x} {thing} and finds {y} more. How many {thing} now?"})
        msgs.append({"role": "assistant", "content": f"{a} has {x} + {y} = {x + y} {thing}."})
    return msgs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, IM_START, IM_END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT, chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False)


def make_tiny_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    assert len(tokenizer) <= MODEL["vocab_size"], (len(tokenizer), MODEL["vocab_size"])
    cfg = LlamaConfig(**MODEL, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_example_data(out: str | Path, n_docs: int = 600, n_chats: int = 1200, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = [" ".join(story(rng) for _ in range(rng.randint(2, 5))) for _ in range(n_docs)]
    chats = [conversation(rng) for _ in range(n_chats)]
    write_jsonl(out / "corpus.jsonl", [{"text": d} for d in docs])
    write_jsonl(out / "chat.jsonl", [{"messages": m} for m in chats])
    (out / "eval.txt").write_text("\n".join(" ".join(story(rng) for _ in range(3)) for _ in range(20)) + "\n")
    chat_text = [f"{m['role']}\n{m['content']}" for c in chats for m in c]
    tokenizer = train_tokenizer(docs + chat_text, MODEL["vocab_size"])
    make_tiny_llama(out / "tiny-llama", tokenizer, seed)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/examples")
    args = p.parse_args()
    out = make_example_data(args.out)
    print(json.dumps({"out": str(out), "files": sorted(x.name for x in out.iterdir())}))


if __name__ == "__main__":
    main()
