"""Hugging Face interop: the one place that maps HF Llama-family names and configs to llmstack's.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases), with grouped-query
attention, tied or untied embeddings and Llama-3 rope scaling. Weights are read and written only
as safetensors (one file or shards with `model.safetensors.index.json`); pickled `.bin` weights and
remote code are refused.

No q/k permutation: llmstack's rotary uses the same half-split `rotate_half` layout as HF, so q/k
rows map one to one (the parity tests in tests/test_hf_parity.py prove it on logits and gradients).
A missing, mis-shaped or unexpected tensor is an error naming the tensor; a config that llmstack's
model cannot express exactly (another activation, MLP bias, sliding window shorter than the
context, other rope types) is an error naming the field, never a silent approximation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmstack import jsonio
from llmstack import checkpoint as ckpt
from llmstack.outputs import atomic_output_dir
from llmstack.config import Config, DataConfig, ModelConfig, RopeScaling, from_dict, to_dict
from llmstack.data import EOT, Tokenizer
from llmstack.errors import UserError
from llmstack.folders import Pretrained
from llmstack.kernels import resolve_ops
from llmstack.model import Llama

log = logging.getLogger("llmstack")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# non-persistent buffers that some older exports still contain; safe to drop
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFConversionError(UserError):
    """An HF folder llmstack cannot convert exactly; the message names the tensor or config field."""


# --- names --------------------------------------------------------------------------------------

def name_map(cfg: ModelConfig) -> dict[str, str]:
    """llmstack state-dict name -> HF name, for every tensor of a model with this config."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        pairs = [("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                 ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                 ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                 ("feed_forward.w2", "mlp.down_proj"),
                 ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
        for a, b in pairs:
            names[f"{ours}{a}.weight"] = f"{hf}{b}.weight"
        if cfg.qkv_bias:
            for a, b in pairs[:3]:
                names[f"{ours}{a}.bias"] = f"{hf}{b}.bias"
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


# --- configs ------------------------------------------------------------------------------------

def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HFConversionError(f"{path}: not valid JSON") from None
    if not isinstance(hf, dict):
        raise HFConversionError(f"{path}: top level must be an object")
    return hf


def _rope(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}  # transformers >= 5
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise HFConversionError(f"{where}: rope_scaling / rope_parameters must be objects")
    theta = float(_number({**hf, **params}, "rope_theta", where, 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise HFConversionError(f"{where}: rope_scaling type {kind!r} is not supported (allowed: default, llama3)")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in scaling]
    if missing:
        raise HFConversionError(f"{where}: rope_scaling of type llama3 lacks {missing[0]}")
    return theta, RopeScaling(factor=_number(scaling, "factor", where), low_freq_factor=_number(scaling, "low_freq_factor", where),
                              high_freq_factor=_number(scaling, "high_freq_factor", where),
                              original_max_position=int(_number(scaling, "original_max_position_embeddings", where)))


def _number(d: dict, key: str, where: str, default=None) -> float:
    """d[key] as a number; a missing or mistyped field is one line naming it."""
    value = d.get(key, default)
    if value is None:
        raise HFConversionError(f"{where}: missing {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HFConversionError(f"{where}: {key} is {value!r}, expected a number")
    return value


def _integer(d: dict, key: str, where: str, default=None) -> int:
    value = _number(d, key, where, default)
    if value != int(value):
        raise HFConversionError(f"{where}: {key} is {value!r}, expected an integer")
    return int(value)


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The llmstack ModelConfig equal to an HF config, or an error naming the field it cannot express."""
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        archs = hf.get("architectures") or [mt]
        raise HFConversionError(f"{where}: architecture {archs[0]} (model_type {mt!r}) is not supported; "
                                f"supported: {', '.join(ARCHITECTURES.values())}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFConversionError(f"{where}: hidden_act {act!r} is not supported (llmstack's MLP is SwiGLU/silu)")
    if hf.get("mlp_bias"):
        raise HFConversionError(f"{where}: mlp_bias=true is not supported")
    if mt == "llama" and hf.get("attention_bias"):
        raise HFConversionError(f"{where}: attention_bias=true (bias on q/k/v/o) is not supported for llama")
    dim, n_heads = _integer(hf, "hidden_size", where), _integer(hf, "num_attention_heads", where)
    if n_heads <= 0:
        raise HFConversionError(f"{where}: num_attention_heads is {n_heads}, must be > 0")
    head_dim = _integer(hf, "head_dim", where) if hf.get("head_dim") is not None else dim // n_heads
    if head_dim * n_heads != dim:
        raise HFConversionError(f"{where}: head_dim {head_dim} x num_attention_heads {n_heads} != hidden_size {dim}; "
                                f"llmstack needs head_dim = hidden_size / heads")
    max_pos = _integer(hf, "max_position_embeddings", where, 2048)
    window = hf.get("sliding_window")
    if window and (mt == "mistral" or hf.get("use_sliding_window")) and window < max_pos:
        # full attention equals sliding-window attention up to the window length
        log.info("%s: sliding_window=%d; llmstack context capped at %d tokens", where, window, window)
        max_pos = int(window)
    theta, scaling = _rope(hf, where)
    return ModelConfig(name=f"hf-{mt}", vocab_size=_integer(hf, "vocab_size", where), dim=dim,
                       n_layers=_integer(hf, "num_hidden_layers", where),
                       n_heads=n_heads, n_kv_heads=_integer(hf, "num_key_value_heads", where, n_heads),
                       ffn_dim=_integer(hf, "intermediate_size", where), norm_eps=float(_number(hf, "rms_norm_eps", where, 1e-6)),
                       rope_theta=theta, rope_scaling=scaling, max_seq_len=max_pos,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=(mt == "qwen2"))


def hf_config_from_model(cfg: ModelConfig, *, model_type: str | None = None, dtype: str = "float32",
                         bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                         pad_token_id: int | None = None) -> dict:
    model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise HFConversionError(f"model.qkv_bias={cfg.qkv_bias} cannot be exported as {model_type} "
                                f"(only qwen2 has q/k/v biases)")
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
           "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
           "initializer_range": cfg.init_std,
           "attention_dropout": 0.0, "use_cache": True}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral":
        out["sliding_window"] = None
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position}
    return out


# --- tensors ------------------------------------------------------------------------------------

def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder: model.safetensors, or the shards listed in its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise HFConversionError(f"{index}: unreadable index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFConversionError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if "/" in f or "\\" in f or not ckpt.is_inside(folder, folder / f)]
        if outside:
            raise HFConversionError(f"{index}: shard {outside[0]!r} is not a file inside {folder}")
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {pickled[0]}: pickled weights are never loaded; convert them to safetensors first)" if pickled else ""
        raise HFConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise HFConversionError(f"{path}: shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise HFConversionError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:100]})") from None
    if weight_map is not None:
        missing = sorted(k for k in weight_map if k not in tensors)
        if missing:
            raise HFConversionError(f"{folder}: tensor {missing[0]} listed in the index is in none of the shards")
    return tensors


def hf_to_llmstack_state(hf_tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "",
                         expected: dict[str, torch.Size] | None = None,
                         names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename HF tensors to llmstack names, float32; any missing/mis-shaped/extra tensor is an error.
    `names`: the part of `name_map(cfg)` these tensors hold (default: all of it)."""
    names = name_map(cfg) if names is None else names
    out = {}
    for ours, theirs in names.items():
        if theirs not in hf_tensors:
            raise HFConversionError(f"{where}: missing tensor {theirs} (llmstack {ours})")
        t = hf_tensors[theirs]
        if expected is not None and tuple(t.shape) != tuple(expected[ours]):
            raise HFConversionError(f"{where}: tensor {theirs} has shape {tuple(t.shape)}, "
                                    f"the llmstack model expects {tuple(expected[ours])} for {ours}")
        out[ours] = t.to(torch.float32)
    extra = sorted(k for k in hf_tensors if k not in set(names.values()) and not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        # some exporters write the tied head anyway; accept it only if it really is the embedding
        if torch.equal(hf_tensors["lm_head.weight"], hf_tensors["model.embed_tokens.weight"]):
            extra.remove("lm_head.weight")
    if extra:
        raise HFConversionError(f"{where}: unexpected tensor {extra[0]} (not part of a {cfg.name} model with this config)")
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Llama(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def llmstack_to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    names = name_map(cfg)
    missing = [k for k in names if k not in state]
    if missing:
        raise HFConversionError(f"llmstack state has no tensor {missing[0]}")
    extra = sorted(k for k in state if k not in names and not (cfg.tie_embeddings and k == "output.weight"))
    if extra:
        raise HFConversionError(f"llmstack state has unexpected tensor {extra[0]} (merge LoRA adapters before export)")
    return {theirs: state[ours].detach().to("cpu", dtype).contiguous() for ours, theirs in names.items()}


# --- loading ------------------------------------------------------------------------------------

def hf_run_config(folder: Path, mcfg: ModelConfig) -> Config:
    """A resolved llmstack Config for an HF folder (its model; its tokenizer if it has one)."""
    folder = Path(folder)
    has_tok = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    data = DataConfig(tokenizer="hf" if has_tok else "bpe", tokenizer_path=str(folder) if has_tok else None,
                      seq_len=min(256, mcfg.max_seq_len))
    return from_dict(to_dict(Config(run_name=folder.name or "hf", model=mcfg, data=data)))


def load_hf(folder: str | Path, device: str | torch.device = "cpu", backend: str = "auto"):
    """An HF folder as a ready llmstack model (`Pretrained`, kind "hf")."""
    folder = Path(folder)
    mcfg = model_config_from_hf(read_hf_config(folder), str(folder / "config.json"))
    cfg = hf_run_config(folder, mcfg)
    device = torch.device(device)
    model = Llama(mcfg, resolve_ops(backend, device.type))
    state = hf_to_llmstack_state(read_hf_tensors(folder), mcfg, str(folder), expected_shapes(mcfg))
    model.load_state_dict(state, strict=not mcfg.tie_embeddings)
    tok = Tokenizer("hf", folder) if cfg.data.tokenizer == "hf" else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "hf")


_CHECKED_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps", "rope_theta",
                   "rope_scaling", "tie_embeddings", "qkv_bias")


def check_compatible(have: ModelConfig, source: ModelConfig, where: str) -> None:
    """The run's model config must equal the source's on every field that changes the function."""
    for f in _CHECKED_FIELDS:
        a, b = getattr(have, f), getattr(source, f)
        if a != b:
            key = {"kv_heads": "n_kv_heads", "hidden_dim": "ffn_dim"}.get(f, f)
            raise HFConversionError(f"model.{key}: the run config has {a}, {where} has {b}")


# --- export ------------------------------------------------------------------------------------

# End-of-turn tokens of the common chat formats (ChatML, Llama 3, Phi-3, Gemma): a chat model's
# answer ends with one of them, not with eos, so generation must stop there too.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
DEFAULT_MAX_NEW_TOKENS = 256


def special_token_ids(tokenizer) -> dict:
    """{"bos": id or None, "eos": [ids: eos first, then the chat turn ends it has], "pad": id or None}."""
    if tokenizer is None:
        return {"bos": None, "eos": [], "pad": None}
    eos = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    if tokenizer.kind != "hf":
        return {"bos": None, "eos": eos, "pad": None}
    tok = tokenizer._tok
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    for name in TURN_END_TOKENS:
        if name in special:
            i = tok.convert_tokens_to_ids(name)
            if i not in eos:
                eos.append(i)
    return {"bos": tok.bos_token_id, "eos": eos, "pad": tok.pad_token_id}


def generation_config(ids: dict, context: int) -> dict:
    """generation_config.json: stop at every eos (turn ends included), greedy, a bounded length."""
    eos = ids["eos"]
    out = {"bos_token_id": ids["bos"], "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": ids["pad"] if ids["pad"] is not None else (eos[0] if eos else None),
           "do_sample": False, "max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, context)}
    return {k: v for k, v in out.items() if v is not None}


def hf_folder_configs(cfg: ModelConfig, tokenizer, *, model_type: str | None = None,
                      dtype: str = "float32") -> tuple[dict, dict]:
    """(config.json, generation_config.json) of an export of a model with this config and tokenizer."""
    ids = special_token_ids(tokenizer)
    eos = ids["eos"]
    hf_cfg = hf_config_from_model(cfg, model_type=model_type, dtype=dtype, bos_token_id=ids["bos"],
                                  eos_token_id=eos[0] if len(eos) == 1 else (eos or None), pad_token_id=ids["pad"])
    return hf_cfg, generation_config(ids, cfg.max_seq_len)


def save_hf_tokenizer(tokenizer, out_dir: Path, *, model_max_length: int | None = None) -> bool:
    """Write a tokenizer that transformers 4.x and 5.x load; our BPE becomes a PreTrainedTokenizerFast."""
    if tokenizer is None:
        return False
    if tokenizer.kind == "hf":
        tok = tokenizer._tok
        old = tok.model_max_length
        if model_max_length:
            tok.model_max_length = model_max_length
        try:
            tok.save_pretrained(str(out_dir))
        finally:
            tok.model_max_length = old
    elif tokenizer.kind == "bpe":
        from transformers import PreTrainedTokenizerFast  # transformers: seconds to import, only HF tokenizers need it
        extra = {"model_max_length": model_max_length} if model_max_length else {}
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, eos_token=EOT, clean_up_tokenization_spaces=False,
                                       **extra)
        fast.save_pretrained(str(out_dir))
    else:
        log.warning("the byte tokenizer has no Hugging Face equivalent; exported folder has no tokenizer")
        return False
    _portable_tokenizer_config(Path(out_dir))
    return True


def _portable_tokenizer_config(out_dir: Path) -> None:
    """Make tokenizer_config.json readable by transformers 4.x as well as 5.x.

    transformers 5 names its tokenizers.json-backed class `TokenizersBackend`, lists extra special
    tokens as `extra_special_tokens` and keeps the chat template only in chat_template.jinja; 4.x
    knows none of these. `PreTrainedTokenizerFast` reads the same tokenizer.json in both lines."""
    path = out_dir / "tokenizer_config.json"
    if not path.is_file() or not (out_dir / "tokenizer.json").is_file():
        return
    tc = json.loads(path.read_text())
    if tc.get("tokenizer_class") in (None, "TokenizersBackend"):
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tc.get("extra_special_tokens")
    if isinstance(extra, list):
        del tc["extra_special_tokens"]
        tc["additional_special_tokens"] = list(dict.fromkeys([*tc.get("additional_special_tokens", []), *extra]))
    template = out_dir / "chat_template.jinja"
    if template.is_file() and "chat_template" not in tc:
        tc["chat_template"] = template.read_text()
    path.write_text(jsonio.dumps(tc, indent=2, ensure_ascii=False))
    special = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
               if tc.get(k)}
    if not (out_dir / "special_tokens_map.json").is_file():
        (out_dir / "special_tokens_map.json").write_text(jsonio.dumps(special, indent=2, ensure_ascii=False))


def write_hf_folder(tmp: Path, *, hf_cfg: dict, gen_cfg: dict, tensors: dict, tokenizer, context: int,
                    max_shard_bytes: int | None = None) -> None:
    """The files of an HF model folder: config, generation config, weights, tokenizer."""
    (tmp / "config.json").write_text(jsonio.dumps(hf_cfg, indent=2))
    (tmp / "generation_config.json").write_text(jsonio.dumps(gen_cfg, indent=2))
    _write_weights(tensors, tmp, max_shard_bytes)
    save_hf_tokenizer(tokenizer, tmp, model_max_length=context)


def export_hf(model: torch.nn.Module, cfg: Config, tokenizer, out_dir: str | Path, *, model_type: str | None = None,
              dtype: str = "float32", max_shard_bytes: int | None = None, command: str = "export",
              overwrite: bool = False) -> Path:
    """Write an HF folder (config.json, generation_config.json, safetensors, tokenizer) that
    AutoModelForCausalLM loads, atomically and never over other data. LoRA adapters are merged
    first; `max_shard_bytes` writes index + shards like HF does."""
    if getattr(model, "lora_config", None):  # its state_dict() holds the adapters only
        raise HFConversionError("export_hf: the model has unmerged LoRA adapters; merge them first "
                                "(llmstack.lora.merge_lora, or load the checkpoint with load_pretrained)")
    out = Path(out_dir)
    state = dict(model.state_dict())
    tensors = llmstack_to_hf_state(state, cfg.model, DTYPES[dtype])
    hf_cfg, gen_cfg = hf_folder_configs(cfg.model, tokenizer, model_type=model_type, dtype=dtype)
    with atomic_output_dir(out, command=command, overwrite=overwrite, manifest=False) as tmp:
        write_hf_folder(tmp, hf_cfg=hf_cfg, gen_cfg=gen_cfg, tensors=tensors, tokenizer=tokenizer,
                        context=cfg.model.max_seq_len, max_shard_bytes=max_shard_bytes)
    return out


def _write_weights(tensors: dict, out: Path, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(jsonio.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))


def hf_to_llmstack_checkpoint(src: Path, dst: Path, *, overwrite: bool = False) -> Path:
    """An HF folder as an llmstack checkpoint folder (weights, config.yaml, tokenizer, manifest)."""
    pre = load_hf(src)
    cfg = pre.cfg
    with atomic_output_dir(dst, command="convert", overwrite=overwrite) as tmp:
        if pre.tokenizer is not None:
            pre.tokenizer.save(tmp)
            cfg.data.tokenizer_path = str((dst / "hf_tokenizer").resolve())
        ckpt.save_model(pre.model, tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (tmp / "hf_config.json").write_text(jsonio.dumps(read_hf_config(src), indent=2))
    return dst


def source_model_type(folder: Path) -> str | None:
    """The HF architecture a model came from (the config of a converted llmstack checkpoint keeps
    it, an HF folder says it), so an export writes a Mistral back as a Mistral."""
    for name in ("hf_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                kind = json.loads(path.read_text()).get("model_type")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return None
            return kind if kind in ARCHITECTURES else None
    return None
