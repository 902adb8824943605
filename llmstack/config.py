"""One typed configuration tree, loaded from YAML and overridden by dotted command-line keys.

A run config may name other YAML files under `defaults:` (paths relative to the file, or to the
`configs/` folder); they are merged first, in order, and the file's own keys win. Every key is
checked against the dataclasses below before any work starts: an unknown key, a wrong type or a
value outside its allowed set raises `ConfigError` whose message is one line naming the key.
"""
from __future__ import annotations

from llmstack.errors import UserError

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# shipped inside the package (llmstack/configs, a link to the repository's configs/ in a checkout),
# so a non-editable install finds the default config too
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError):
    """A bad configuration value; the message is one line naming the key."""


@dataclass
class RopeScaling:
    """Llama-3 style frequency scaling of the rotary embedding."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None means n_heads (plain multi-head attention)
    ffn_dim: Optional[int] = None  # None means Llama's rounding of 8/3 * dim
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 256
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass
class DataConfig:
    source: Literal["stdlib", "hf"] = "stdlib"
    dir: str = "data/stdlib"  # where the built corpus (tokens + tokenizer) lives
    tokenizer: Literal["bpe", "bytes", "hf"] = "bpe"
    tokenizer_path: Optional[str] = None  # HF tokenizer folder when tokenizer == "hf"
    seq_len: int = 256
    val_fraction: float = 0.02
    doc_masking: bool = False  # packed documents do not attend to each other
    # data.source == "hf": local files or a saved dataset folder read through `datasets`
    paths: list[str] = field(default_factory=list)
    format: Literal["text", "chat"] = "text"
    text_field: str = "text"
    val_split_fraction: float = 0.05
    streaming: bool = False
    num_proc: int = 1
    max_files: Optional[int] = None  # cap on stdlib files, for quick experiments


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 1337
    # auto: the run's latest checkpoint; never; or a checkpoint folder to continue from when the
    # run has none of its own yet (e.g. one written by `llmstack checkpoint consolidate`)
    resume: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    nonfinite: Literal["skip", "abort"] = "skip"
    max_nonfinite_in_row: int = 5
    spike_factor: float = 3.0  # loss above this multiple of the running median is an event
    deterministic: bool = False
    profile: bool = False
    profile_steps: list[int] = field(default_factory=lambda: [5, 10])
    sample_prompt: str = "def "
    sample_tokens: int = 64
    progress: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 3
    save_on_interrupt: bool = True


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "llmstack"
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    entity: Optional[str] = None
    log_checkpoint_artifact: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # derived from world size / (tp * pp)
    zero_stage: Literal[0, 1, 2, 3] = 0
    sequence_parallel: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON merged over the generated one
    timeout_s: int = 300


@dataclass
class KernelsConfig:
    backend: Literal["auto", "triton", "torch"] = "auto"
    # tokens per chunk of the fused linear + cross-entropy; 0 = sized so one chunk of logits fits
    # the loss driver's memory budget (512 MiB: 1k-2k tokens at a 128k vocabulary)
    loss_chunk_size: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # llmstack checkpoint/run dir or HF folder
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the distillation term; (1 - alpha) goes to hard-label CE
    beta: float = 0.5  # generalized JSD mixing coefficient


# --- prune ---
@dataclass
class SparsityConfig:
    # a pruned init_from (a `llmstack prune` output, or a checkpoint of a run that kept its mask)
    # stays pruned: gradients of pruned weights are zeroed and the mask re-applied after every
    # optimizer step; checkpoints carry the mask and a resumed run restores it
    keep_mask: bool = True
# --- /prune ---


@dataclass
class Config:
    run_name: str = "tiny"
    out_dir: Optional[str] = None  # default runs/<run_name>
    init_from: Optional[str] = None  # "hf:PATH" or an llmstack checkpoint dir
    precision: Literal["fp32", "bf16"] = "fp32"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # llmstack prune / sparse training

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.run_name}")


# --- building dataclasses from plain dicts, with one-line errors --------------------------------

def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(next(a for a in allowed if a == value)):
            raise ConfigError(f"{key}: got {value!r}, allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected {_describe(tp)}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return str(value)
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"unknown key {prefix}{k}; allowed keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config with both is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{node.start_mark.name}: line {key_node.start_mark.line + 1}: "
                                  f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _resolve_include(name: str, here: Path) -> Path:
    for candidate in (here / name, CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"defaults: included file {name!r} not found next to {here} or in {CONFIGS_DIR}")


def load_raw(path: str | Path, _including: tuple[Path, ...] = ()) -> dict:
    """The merged dict of a YAML file and its `defaults` includes (recursively)."""
    path = Path(path)
    if path.resolve() in _including:
        chain = " -> ".join(p.name for p in (*_including, path.resolve()))
        raise ConfigError(f"defaults: {path} includes itself ({chain})")
    data = _read_yaml(path)
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: defaults: got {includes!r}, expected a file name or a list of file names")
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, load_raw(_resolve_include(inc, path.parent), (*_including, path.resolve())))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return raw


def from_dict(raw: dict) -> Config:
    """A config as stored in a checkpoint: types and ranges checked, paths not (a saved config
    must load anywhere, after the folders it once named are gone)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: got {type(raw).__name__}, expected a mapping of keys")
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A config to run now: everything `from_dict` checks, and the paths it names exist."""
    raw = load_raw(path) if path else {}
    cfg = from_dict(apply_overrides(raw, overrides or []))
    validate_run(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    m = cfg.model
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
        _check(getattr(m, key) > 0, f"model.{key}: got {getattr(m, key)}, must be > 0")
    _check(m.dim % m.n_heads == 0, f"model.dim: {m.dim} is not divisible by model.n_heads={m.n_heads}")
    _check(m.head_dim % 2 == 0, f"model.dim/n_heads: head dim {m.head_dim} must be even for rotary embeddings")
    _check(m.n_kv_heads is None or m.n_kv_heads >= 1,
           f"model.n_kv_heads: got {m.n_kv_heads}, must be >= 1 (or null for n_heads)")
    _check(1 <= m.kv_heads <= m.n_heads and m.n_heads % m.kv_heads == 0,
           f"model.n_kv_heads: got {m.n_kv_heads}, must divide model.n_heads={m.n_heads}")
    _check(m.norm_eps > 0, f"model.norm_eps: got {m.norm_eps}, must be > 0")
    _check(m.rope_theta > 0, f"model.rope_theta: got {m.rope_theta}, must be > 0")
    _check(m.init_std > 0, f"model.init_std: got {m.init_std}, must be > 0")
    if m.rope_scaling is not None:
        r = m.rope_scaling
        _check(r.factor >= 1, f"model.rope_scaling.factor: got {r.factor}, must be >= 1")
        _check(0 < r.low_freq_factor < r.high_freq_factor,
               f"model.rope_scaling: low_freq_factor {r.low_freq_factor} must be > 0 and < high_freq_factor {r.high_freq_factor}")
        _check(r.original_max_position > 0,
               f"model.rope_scaling.original_max_position: got {r.original_max_position}, must be > 0")
    if cfg.data.tokenizer == "bytes":
        _check(m.vocab_size >= 257, f"model.vocab_size: got {m.vocab_size}, byte tokenizer needs >= 257 (256 bytes + end-of-text)")
    elif m.vocab_size > 65535 and cfg.data.source == "stdlib":
        pass  # stored as uint32 then
    _check(cfg.data.seq_len > 0, f"data.seq_len: got {cfg.data.seq_len}, must be > 0")
    _check(cfg.data.seq_len <= m.max_seq_len,
           f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(0.0 < cfg.data.val_fraction < 0.5, f"data.val_fraction: got {cfg.data.val_fraction}, allowed (0, 0.5)")
    if cfg.data.source == "hf":
        _check(bool(cfg.data.paths), "data.paths: data.source=hf needs at least one local file or dataset folder")
    if cfg.data.tokenizer == "hf":
        _check(bool(cfg.data.tokenizer_path), "data.tokenizer_path: data.tokenizer=hf needs a local tokenizer folder")
    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_every", "eval_batches", "log_every",
                "max_nonfinite_in_row"):
        _check(getattr(t, key) > 0, f"train.{key}: got {getattr(t, key)}, must be > 0")
    _check(0 <= t.seed < 2**63, f"train.seed: got {t.seed}, allowed [0, 2**63)")
    _check(t.spike_factor > 1, f"train.spike_factor: got {t.spike_factor}, must be > 1")
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr: got {o.lr}, must be > 0")
    _check(o.weight_decay >= 0, f"optim.weight_decay: got {o.weight_decay}, must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2: got {o.beta1}/{o.beta2}, allowed [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip: got {o.grad_clip}, must be >= 0 (0 disables)")
    _check(o.eps > 0, f"optim.eps: got {o.eps}, must be > 0")
    s = cfg.schedule
    _check(s.warmup_steps >= 0, f"schedule.warmup_steps: got {s.warmup_steps}, must be >= 0")
    _check(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio: got {s.min_lr_ratio}, allowed [0, 1]")
    _check(0 < s.decay_fraction <= 1, f"schedule.decay_fraction: got {s.decay_fraction}, allowed (0, 1]")
    c = cfg.checkpoint
    _check(c.every_steps > 0, f"checkpoint.every_steps: got {c.every_steps}, must be > 0")
    _check(c.keep_last > 0, f"checkpoint.keep_last: got {c.keep_last}, must be > 0")
    p = cfg.parallel
    _check(p.tp >= 1, f"parallel.tp: got {p.tp}, must be >= 1")
    _check(p.pp >= 1, f"parallel.pp: got {p.pp}, must be >= 1")
    # how tp/pp split the model and the world: llmstack.parallel.plan.check_layout
    _check(p.timeout_s > 0, f"parallel.timeout_s: got {p.timeout_s}, must be > 0")
    _check(p.dp is None or p.dp >= 1, f"parallel.dp: got {p.dp}, must be >= 1 (or null: derived from the world size)")
    _check(cfg.kernels.loss_chunk_size >= 0, f"kernels.loss_chunk_size: got {cfg.kernels.loss_chunk_size}, must be >= 0 (0 = auto)")
    _check(0 <= cfg.lora.dropout < 1, f"lora.dropout: got {cfg.lora.dropout}, allowed [0, 1)")
    if cfg.lora.enabled:
        _check(cfg.lora.rank > 0, f"lora.rank: got {cfg.lora.rank}, must be > 0")
        _check(cfg.lora.alpha > 0, f"lora.alpha: got {cfg.lora.alpha}, must be > 0")
        allowed = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        bad = [x for x in cfg.lora.targets if x not in allowed]
        _check(not bad, f"lora.targets: unknown {bad}; allowed: {', '.join(sorted(allowed))}")
    d = cfg.distill
    _check(d.temperature > 0, f"distill.temperature: got {d.temperature}, must be > 0")
    _check(0 <= d.alpha <= 1, f"distill.alpha: got {d.alpha}, allowed [0, 1]")
    _check(0 < d.beta < 1, f"distill.beta: got {d.beta}, allowed (0, 1)")


def validate_run(cfg: Config) -> None:
    """Checks made only for a run about to start (the files it will read, a schedule that would
    never reach its peak): a config stored in a checkpoint never fails on them later."""
    t = cfg.train
    _check(cfg.schedule.warmup_steps <= t.max_steps,
           f"schedule.warmup_steps: {cfg.schedule.warmup_steps} exceeds train.max_steps={t.max_steps}")
    _check(t.resume in ("auto", "never") or Path(t.resume).is_dir(),
           f"train.resume: got {t.resume!r}; allowed auto, never, or an existing checkpoint folder")
    ds = cfg.parallel.deepspeed_config
    _check(ds is None or Path(ds).is_file(), f"parallel.deepspeed_config: {ds}: no such file")
    out = cfg.run_dir
    _check(not out.exists() or out.is_dir(), f"out_dir: {out} exists and is a file, not a folder")
