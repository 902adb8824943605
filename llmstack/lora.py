"""LoRA fine-tuning on the plain llmstack model, through `peft`.

Why peft and not our own module: llmstack's projections are ordinary `nn.Linear` modules with
stable names (wq/wk/wv/wo, w1/w2/w3), so `peft.inject_adapter_in_model` wraps them in place and
the model stays an llmstack `Llama` (same forward, KV cache, loss, checkpoint code). We get peft's
tested initialization, scaling (alpha / rank) and dropout without a wrapper class renaming every
parameter. `FeedForward` already falls back to its unfused path for wrapped w1/w3.

Checkpoints hold adapters only. The base weights come from `init_from` (or the seeded random
init), which `pretrained.build_model` loads *before* `apply_lora`; so the model's `state_dict()` is
narrowed to the adapter tensors, and loading such a state tolerates the (already present) base
weights being absent. With that, `LocalEngine.save`/`load` write and resume adapter-only
checkpoints with no change to the trainer. A LoRA checkpoint therefore needs its `init_from` to
stay where it was: `pretrained.load_lora_checkpoint` rebuilds base + adapters and merges them, and
`llmstack convert --to hf RUN DST` exports the merged model as a full HF checkpoint.

ZeRO-3 partitions parameters; `adapter_state_dict` gathers them before reading (otherwise each
rank would save its own size-0 or partial slices: an incomplete adapter).

PEFT interop: `llmstack export --format peft` (`export.export_peft`) writes a LoRA checkpoint as
adapter_config.json + adapter_model.safetensors under HF module names (`base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight`), for `peft.PeftModel.from_pretrained` on the HF export of the base. A PEFT
adapter folder as `init_from` starts from its base model plus the adapter: with `lora.enabled`
(rank, alpha and targets equal to the adapter's) LoRA training continues from its A/B weights;
without, the adapter is merged into the weights (alpha / r * B @ A) for full fine-tuning.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from llmstack import jsonio
from llmstack.config import LoraConfig
from llmstack.checkpoint import load_tensors
from llmstack.errors import UserError
from llmstack.hf import name_map
from llmstack.model import Llama

ADAPTER = "default"


class LoraError(UserError):
    pass


def _is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer  # peft: imported only when LoRA is on
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_model(model: nn.Module) -> bool:
    return bool(getattr(model, "lora_config", None)) and bool(lora_layers(model))


def _keep_adapters_only(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if not _is_adapter_name(k)]:
        del state_dict[k]


def _base_may_be_absent(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if _is_adapter_name(k)]


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap the target projections with LoRA adapters in place; only adapter weights stay trainable."""
    import peft
    if is_lora_model(model):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    pcfg = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                           target_modules=list(lora_cfg.targets), bias="none")
    model = peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_name(name))
    model.lora_config = lora_cfg
    model.register_state_dict_post_hook(_keep_adapters_only)
    model.register_load_state_dict_post_hook(_base_may_be_absent)
    return model


def _gathered(params: list[torch.Tensor]):
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed  # deepspeed: slow to import, only distributed layouts need it
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) adapter tensors on CPU, named as in the model."""
    named = [(n, p) for n, p in model.named_parameters() if _is_adapter_name(n)]
    with _gathered([p for _, p in named]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    """adapter.safetensors + adapter_config.json (rank, alpha, targets, base model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / "adapter.safetensors"), metadata={"format": "llmstack-lora"})
    c = model.lora_config
    (folder / "adapter_config.json").write_text(jsonio.dumps(
        {"rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "targets": list(c.targets), "base": base}, indent=2))
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    load_adapter_tensors(model, load_tensors(Path(folder) / "adapter.safetensors"), str(folder))


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Exactly the model's adapter tensors (a missing or extra one is an error naming it)."""
    own = {n for n, _ in model.named_parameters() if _is_adapter_name(n)}
    for k in sorted(own):
        if k not in tensors:
            raise LoraError(f"{where}: missing adapter tensor {k}")
    extra = sorted(set(tensors) - own)
    if extra:
        raise LoraError(f"{where}: unexpected adapter tensor {extra[0]}")
    model.load_state_dict(tensors, strict=True)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A plain llmstack model whose weights are base + scaling * B @ A (the adapters folded in)."""
    layers = lora_layers(model)
    named = dict(model.named_parameters())
    with _gathered(list(named.values())):
        state = {}
        for n, p in named.items():
            if not _is_adapter_name(n):
                state[n.replace(".base_layer.", ".")] = p.detach().clone()
        for n, m in layers.items():
            state[f"{n}.weight"] += m.get_delta_weight(ADAPTER).to(state[f"{n}.weight"].dtype)
    merged = Llama(model.cfg, model.ops)
    merged.loss_chunk_size = getattr(model, "loss_chunk_size", merged.loss_chunk_size)
    merged.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    return merged.to(next(model.parameters()).device)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return merge_lora(model).state_dict()


# --- PEFT adapter folders (adapter_config.json + adapter_model.safetensors) -------------------------

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# the adapter_config keys every peft release since 0.13 knows (newer keys break older readers)
PEFT_DEFAULTS = {"fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
                  "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                  "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "revision": None}


def hf_module_names(mcfg) -> dict[str, str]:
    """llmstack module name -> HF module name, for every linear LoRA can target."""
    return {o[:-len(".weight")]: t[:-len(".weight")] for o, t in name_map(mcfg).items()
            if o.endswith(".weight") and (".attention.w" in o or ".feed_forward.w" in o)}


def is_peft_adapter(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and (Path(path) / PEFT_WEIGHTS).is_file()


def read_peft_adapter(path: str | Path, mcfg) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter as (llmstack LoraConfig, tensors named as in an llmstack LoRA model);
    anything llmstack's LoRA cannot reproduce exactly is an error naming the field."""
    path = Path(path)
    where = path / PEFT_CONFIG
    try:
        pc = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{where}: unreadable ({e})") from None
    if pc.get("peft_type") != "LORA":
        raise LoraError(f"{where}: peft_type {pc.get('peft_type')!r} is not supported (LORA)")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                "rank_pattern", "alpha_pattern"):
        if pc.get(key) not in (None, False, {}, PEFT_DEFAULTS.get(key)):
            raise LoraError(f"{where}: {key}={pc[key]!r} is not supported by llmstack's LoRA")
    if pc.get("bias", "none") != "none":
        raise LoraError(f"{where}: bias={pc['bias']!r} is not supported (none)")
    ours_of = {hf: ours for ours, hf in hf_module_names(mcfg).items()}
    tensors = {}
    for key, t in load_tensors(path / PEFT_WEIGHTS).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module, _, rest = name.partition(".lora_")
        ab = rest.split(".")[0]
        if module not in ours_of or ab not in ("A", "B"):
            raise LoraError(f"{path / PEFT_WEIGHTS}: tensor {key} is not a LoRA A/B matrix of a {mcfg.name} projection")
        tensors[f"{ours_of[module]}.lora_{ab}.{ADAPTER}.weight"] = t.float()
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors})
    cfg = LoraConfig(enabled=True, rank=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                     dropout=float(pc.get("lora_dropout") or 0.0), targets=targets)
    return cfg, tensors


def peft_base_of(spec: str) -> tuple[str, Path | None]:
    """For `init_from`: a PEFT adapter folder gives (its base model folder, the adapter folder);
    anything else is returned as is, with no adapter."""
    path = Path(spec[3:] if spec.startswith("hf:") else spec)
    if not is_peft_adapter(path):
        return spec, None
    base = json.loads((path / PEFT_CONFIG).read_text()).get("base_model_name_or_path") or ""
    for candidate in (Path(base), path / base):
        if base and (candidate / "config.json").is_file():
            return str(candidate), path
    raise LoraError(f"init_from {path}: the adapter's base_model_name_or_path {base!r} is not a local model folder "
                    f"(nothing is downloaded; export or copy the base and set it in {PEFT_CONFIG})")


@torch.no_grad()
def load_peft_adapter(model: nn.Module, path: str | Path) -> None:
    """Into a LoRA model: the adapter's A/B weights (its rank, alpha and targets must be the
    run's `lora` config). Into a plain model: base + alpha / r * B @ A, merged."""
    adapter_cfg, tensors = read_peft_adapter(path, model.cfg)
    if is_lora_model(model):
        have = model.lora_config
        for field in ("rank", "alpha", "targets"):
            a, b = getattr(have, field), getattr(adapter_cfg, field)
            if (sorted(a) if field == "targets" else a) != b:
                raise LoraError(f"lora.{field}: the run config has {a}, the PEFT adapter {path} has {b}")
        load_adapter_tensors(model, tensors, str(path))
        return
    scaling = adapter_cfg.alpha / adapter_cfg.rank
    params = dict(model.named_parameters())
    for key in [k for k in tensors if ".lora_A." in k]:
        module = key.split(".lora_A.")[0]
        delta = tensors[f"{module}.lora_B.{ADAPTER}.weight"] @ tensors[key]
        params[f"{module}.weight"].add_((scaling * delta).to(params[f"{module}.weight"].dtype))
