"""The model: loading it and its tokenizer, applying the fine-tuning method, and spreading it over ranks.

Precision: the frozen base of a PEFT method is loaded in the compute dtype (bf16/fp16) and its trainable
adapter kept in fp32; full fine-tuning keeps fp32 master weights. bf16/fp16 compute runs under autocast
(and, with FSDP2, a matching MixedPrecisionPolicy so all-gathers move half the bytes).

Distribution (`uses_fsdp`): full fine-tuning over more than one process is sharded with FSDP2 `fully_shard` per
decoder layer and at the root (unless `method.full.sharding` is ddp); LoRA, QLoRA and IA3 are sharded the same way
(frozen base and adapter together) when their `sharding` says fsdp, or auto and the base takes more than half a
GPU, and replicated with DDP otherwise, as are prefix and prompt tuning.

Sharded loading: a model FSDP2 shards is built with its parameters on the meta device (no memory), a PEFT adapter
added (initialised on the CPU as on a loaded base, over stand-ins of the base without storage), sharded, and only
then given storage: each rank's share of each parameter (its rows: FSDP2 shards dim 0). Each rank reads its rows
straight from the safetensors files (memory-mapped: a rank touches only its own bytes), so no rank ever holds the
whole model and per-rank memory at load is about 1/world size of it. A source without safetensors (a GGUF file,
.bin weights) is read whole by rank 0 only and broadcast shard by shard.

Seeding: the caller seeds torch before `build` so adapters start identical on every rank and across retries.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import attention, fused_lora, fused_ops
from .config import MethodConfig, ModelConfig, TrainerConfig
from .errors import PermanentError
from .runtime import Runtime

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    return None if precision == "fp32" else DTYPES[precision]


def check_supported(cfg: TrainerConfig, device: torch.device) -> None:
    """Permanent errors that can be told before loading anything."""
    method = cfg.method.type
    if method == "qlora" and device.type != "cuda":
        raise PermanentError("method qlora needs a CUDA GPU (bitsandbytes 4-bit); this worker has none")
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise PermanentError("method qlora needs the bitsandbytes package, which this trainer image lacks")
    if cfg.output.merge_adapter and method in ("prefix", "prompt"):
        raise PermanentError(f"output.mergeAdapter: a {method}-tuning adapter cannot be merged into the weights")
    if cfg.training.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PermanentError("training.precision bf16 is not supported by this GPU; use fp16")


def source_kwargs(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should look (a local directory: sources.py fetched any remote model), and the arguments
    every load shares."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    path = Path(cfg.source)
    if not path.is_dir():
        raise PermanentError(f"model.source {cfg.source}: no such directory (use hf://<id> for a hub model)")
    if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
        raise PermanentError(f"model.ggufFile {cfg.gguf_file}: not found in {cfg.source}")
    return str(path), kwargs


@contextmanager
def _local_errors_are_permanent(cfg: ModelConfig, what: str) -> Iterator[None]:
    """A local directory that cannot be loaded will not load on a retry either."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise PermanentError(f"model.source {cfg.source}: cannot load the {what}: {e}") from None


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    where, kwargs = source_kwargs(cfg)
    with _local_errors_are_permanent(cfg, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    if not getattr(tok, "is_fast", False):
        raise PermanentError(f"model {cfg.source}: a fast tokenizer is needed (token offsets locate the loss)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class ParamCounts:
    """What the MFU formulas need."""

    matmul: int  # parameters in matmuls per token: all but the input embedding, LM head included (even tied)
    trainable: int
    total: int
    layers: int
    attention_width: int  # heads x head dim


def _numel(p: torch.Tensor) -> int:
    shape = getattr(getattr(p, "quant_state", None), "shape", None)  # bitsandbytes 4-bit packs two per byte
    return math.prod(shape) if shape is not None else p.numel()


def count_params(model: nn.Module, base: Any, is_peft: bool) -> ParamCounts:
    seen: set[int] = set()
    frozen = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += _numel(p)
        else:
            frozen += _numel(p)
    base_total = frozen if is_peft else trainable + frozen
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is not None and head.weight is emb
    matmul = base_total - _numel(emb) + (_numel(emb) if tied else 0)
    text = base.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ParamCounts(
        matmul=matmul,
        trainable=trainable,
        total=trainable + frozen,
        layers=text.num_hidden_layers,
        attention_width=text.num_attention_heads * head_dim,
    )


def load_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    where, kwargs = source_kwargs(cfg)
    with _local_errors_are_permanent(cfg, "model config"):
        return AutoConfig.from_pretrained(where, **kwargs)


def attention_backend(cfg: TrainerConfig, config: Any, device: torch.device, packed: bool) -> attention.Backend | None:
    """The packed attention, chosen once for the model's life (None: padded batches, plain sdpa)."""
    if not packed:
        return None
    backend = attention.choose(config, device, compute_dtype(cfg.training.precision))
    log.info("packed attention: %s (%s)", backend.name, backend.why)
    return backend


def load_dtype(cfg: TrainerConfig) -> torch.dtype:
    """The dtype the weights are held in: a frozen base needs no fp32 master copy; trained weights do."""
    dtype = compute_dtype(cfg.training.precision)
    return dtype if (cfg.method.is_peft and dtype is not None) else torch.float32


def load_model(cfg: TrainerConfig, config: Any, device: torch.device, backend: attention.Backend | None) -> Any:
    from transformers import AutoModelForCausalLM

    where, kwargs = source_kwargs(cfg.model)
    method = cfg.method.type
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        q = cfg.method.qlora
        qdtype = DTYPES[q.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=qdtype,
            bnb_4bit_quant_storage=qdtype,
        )
        kwargs["device_map"] = {"": str(device)}
        dtype = qdtype
    else:
        dtype = load_dtype(cfg)
    implementation = attention.register(backend) if backend else "sdpa"
    with _local_errors_are_permanent(cfg.model, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=dtype, attn_implementation=implementation, **kwargs
        )
    model.config.use_cache = False
    return model if method == "qlora" else model.to(device)


def empty_model(cfg: TrainerConfig, config: Any, backend: attention.Backend | None) -> Any:
    """The model with its parameters on the meta device (no storage); buffers (rotary tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    implementation = attention.register(backend) if backend else "sdpa"
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=load_dtype(cfg),
            attn_implementation=implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.config.use_cache = False
    return model


def safetensors_files(directory: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file that holds it, as transformers finds them (an index, or the one
    model.safetensors); empty when the directory has neither."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of a dim-0 shard, as FSDP2 splits them (torch.chunk: ceil(rows/world) each, the last ones short)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def checkpoint_key(name: str) -> str:
    """A parameter's name in the model's files: PEFT's wrapper adds base_model.model. in front and .base_layer
    inside the layers it adapts."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def load_shards(model: nn.Module, names: list[str], files: dict[str, Path], source: str) -> None:
    """Fill each named parameter's local shard (and each persistent buffer the files hold) with its rows from the
    safetensors files."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    params = dict(model.named_parameters())  # tied weights once, under their first name
    targets = {n: params[n] for n in names}
    persistent = set(model.state_dict())
    targets.update({n: b for n, b in model.named_buffers() if n in persistent and checkpoint_key(n) in files})
    missing = sorted(checkpoint_key(n) for n in targets if checkpoint_key(n) not in files)
    if missing:
        raise PermanentError(f"model.source {source}: the safetensors files lack {', '.join(missing[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[checkpoint_key(name)], []).append(name)
    for path, in_file in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in in_file:
                target = targets[name]
                stored = f.get_slice(checkpoint_key(name))
                if list(stored.get_shape()) != list(target.shape):
                    raise PermanentError(
                        f"model.source {source}: {checkpoint_key(name)} has shape {stored.get_shape()} in "
                        f"{path.name}, the model config says {list(target.shape)}"
                    )
                if isinstance(target, DTensor):
                    assert target.placements == (Shard(0),), target.placements
                    mesh = target.device_mesh
                    start, stop = shard_rows(target.shape[0], mesh.get_local_rank(), mesh.size())
                    local = target.to_local()
                    if stop > start:
                        local.copy_(stored[start:stop])
                else:
                    target.copy_(stored[:])


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, names: list[str], cfg: TrainerConfig, config: Any, rt: Runtime) -> None:
    """Rank 0 reads the whole model on the CPU and sends each rank its share of the named parameters; the others
    hold nothing extra."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full: dict[str, torch.Tensor] = {}
    if rt.is_main:
        stored = load_model(cfg, config, torch.device("cpu"), None).state_dict()
        full = {n: stored[checkpoint_key(n)] for n in names}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)


def materialize(model: nn.Module, cfg: TrainerConfig, config: Any, rt: Runtime) -> None:
    """Give a sharded model whose base is on the meta device storage on this rank's device, and load this rank's
    share of the base weights. What already had values (buffers, a PEFT adapter initialised on the CPU) keeps them."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    kept = {name: _local(t).clone() for name, t in tensors if not t.is_meta}  # to_empty drops them; they are small
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    model.to_empty(device=rt.device)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in kept:
                _local(t).copy_(kept[name])
    where, _ = source_kwargs(cfg.model)
    files = {} if cfg.model.gguf_file else safetensors_files(Path(where))
    if files:
        load_shards(model, empty, files, cfg.model.source)
    else:
        log.info("model %s: no safetensors files; rank 0 reads it and sends each rank its shard", cfg.model.source)
        broadcast_from_rank0(model, empty, cfg, config, rt)


def _replace_params(model: nn.Module, replace: Any) -> set[int]:
    """Swap parameters for `replace(p)` (None: keep p), a tied parameter for one shared replacement; returns the
    ids of the replacements."""
    done: dict[int, nn.Parameter] = {}
    new_ids: set[int] = set()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in done:
                new = replace(p)
                done[id(p)] = p if new is None else nn.Parameter(new, requires_grad=p.requires_grad)
                if new is not None:
                    new_ids.add(id(done[id(p)]))
            setattr(module, name, done[id(p)])
    return new_ids


def stand_ins(model: nn.Module) -> set[int]:
    """Meta parameters -> CPU tensors of the same shape and dtype with one shared element (no memory), so that a
    PEFT adapter added to the model is created and initialised on the CPU exactly as on a loaded base (PEFT moves
    an adapter to its base layer's device: on the meta device its values would be lost). Returns their ids."""
    return _replace_params(model, lambda p: torch.zeros((), dtype=p.dtype).expand(p.shape) if p.is_meta else None)


def back_to_meta(model: nn.Module, ids: set[int]) -> None:
    """The stand-ins -> meta parameters again, for FSDP2 to shard without storage; the adapter stays as it is."""
    _replace_params(model, lambda p: torch.empty_like(p, device="meta") if id(p) in ids else None)


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peft_config(method: MethodConfig) -> Any:
    import peft

    t = method.type
    if t in ("lora", "dora", "qlora"):
        lo = method.lora
        targets: str | list[str] = "all-linear" if lo.target_modules == ["all-linear"] else lo.target_modules
        return peft.LoraConfig(
            r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=targets,
            use_rslora=lo.rslora,
            use_dora=t == "dora",
            task_type="CAUSAL_LM",
        )
    if t == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=method.prefix.num_virtual_tokens, task_type="CAUSAL_LM")
    if t == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=method.prompt.num_virtual_tokens, task_type="CAUSAL_LM")
    if t == "ia3":
        return peft.IA3Config(
            target_modules=method.ia3.target_modules,
            feedforward_modules=method.ia3.feedforward_modules,
            task_type="CAUSAL_LM",
        )
    raise ValueError(f"not a PEFT method: {t}")


def _init_prompt_from_text(model: Any, tokenizer: Any, text: str) -> None:
    """Start the virtual tokens from the embeddings of a text, repeated to fill them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PermanentError("method.prompt.initText tokenises to nothing")
    embedding = model.prompt_encoder[model.active_adapter].embedding
    n = embedding.weight.shape[0]
    ids = (ids * math.ceil(n / len(ids)))[:n]
    with torch.no_grad():
        words = model.get_input_embeddings()(torch.tensor(ids, device=embedding.weight.device))
        embedding.weight.copy_(words.to(embedding.weight.dtype))


def apply_method(model: Any, cfg: TrainerConfig, tokenizer: Any) -> Any:
    """Wrap the base with the PEFT adapter (trainable parts in fp32), or unfreeze everything for full."""
    method = cfg.method
    gc = cfg.training.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    if method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if not method.is_peft:
        model.requires_grad_(True)
        return model
    import peft

    try:
        pmodel = peft.get_peft_model(model, peft_config(method))
    except ValueError as e:  # e.g. target modules that do not exist in this architecture
        raise PermanentError(f"method {method.type}: {e}") from None
    if method.type == "prompt" and method.prompt.init_text:
        _init_prompt_from_text(pmodel, tokenizer, method.prompt.init_text)
    fused = fused_lora.fuse(pmodel)
    if fused:
        log.info("%d LoRA layers add their update inside one matmul (fused_lora)", fused)
    for p in pmodel.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return pmodel


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (what FSDP shards and torch.compile compiles one by one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise PermanentError(f"cannot find the decoder layers of {type(base).__name__} to shard or compile")
    return layers


def shard_with_fsdp(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard(model: nn.Module, cfg: TrainerConfig, config: Any, rt: Runtime, standing_in: set[int]) -> None:
    """FSDP2 over the process group; a base of stand-ins (`stand_ins`) is then loaded, each rank its share."""
    if standing_in:
        back_to_meta(model, standing_in)
    shard_with_fsdp(model, compute_dtype(cfg.training.precision))
    if standing_in:
        materialize(model, cfg, config, rt)


@dataclass
class Prepared:
    model: nn.Module  # the model as built (PEFT wrapper or base); what is saved and exported
    train_module: nn.Module  # what the loop calls: DDP-wrapped, FSDP-sharded or the model itself
    sharded: bool
    counts: ParamCounts
    packed_attention: attention.Backend | None  # None: padded batches
    loaded: dict[str, int]  # this rank: parameter bytes held, peak RSS before and after the model was built


def base_bytes(model: nn.Module, cfg: TrainerConfig) -> int:
    """What the weights (a PEFT method's frozen base) take on one device."""
    n = sum(p.numel() for p in model.parameters())
    if cfg.method.type == "qlora":
        return n * 9 // 16  # 4 bits a weight, plus the quantisation constants
    return n * load_dtype(cfg).itemsize


def device_memory(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def uses_fsdp(method: MethodConfig, world_size: int, weights: int, device_bytes: int | None) -> bool:
    """FSDP2, or DDP (one process: neither). `sharding: auto` shards full fine-tuning whenever there are several
    processes (weights, gradients and optimizer state all scale with the model), and a PEFT method's frozen base
    only when it takes more than half a device: a whole base on every device needs no all-gathers, and the other
    half is for activations and the adapter."""
    setting = method.sharding
    if world_size == 1 or setting in (None, "ddp"):
        return False
    if setting == "fsdp" or not method.is_peft:
        return True
    return device_bytes is not None and weights > device_bytes // 2


def build(cfg: TrainerConfig, tokenizer: Any, rt: Runtime, packed: bool) -> Prepared:
    before = peak_rss_bytes()
    config = load_config(cfg.model)
    backend = attention_backend(cfg, config, rt.device, packed)
    skeleton = empty_model(cfg, config, backend)  # parameters on the meta device: a size, and FSDP2's starting point
    weights, device_bytes = base_bytes(skeleton, cfg), device_memory(rt.device)
    sharded = uses_fsdp(cfg.method, rt.world_size, weights, device_bytes)
    if rt.distributed:
        log.info(
            "%s over %d ranks (weights %.1f GiB%s)",
            "FSDP2" if sharded else "DDP",
            rt.world_size,
            weights / 2**30,
            f", device {device_bytes / 2**30:.0f} GiB" if device_bytes else "",
        )
    if sharded and cfg.method.type == "dora":
        raise PermanentError(
            "method dora with FSDP2 (method.lora.sharding fsdp, or auto with a base over half a GPU) is not supported: "
            "DoRA's magnitudes start from the whole base weights; use lora, or sharding ddp on GPUs that hold the base"
        )
    # QLoRA quantises while loading: each rank loads the whole 4-bit base (stored in the compute dtype, which FSDP2
    # can shard) on its GPU, then shards it.
    on_meta = sharded and cfg.method.type != "qlora"
    standing_in: set[int] = set()
    if on_meta:
        base = skeleton
        standing_in = stand_ins(base)
    else:
        base = load_model(cfg, config, rt.device, backend)
    del skeleton
    model = apply_method(base, cfg, tokenizer)
    counts = count_params(model, base, cfg.method.is_peft)
    log.info(
        "model %s: %s parameters, %s trainable (%.3f%%), method %s",
        type(base).__name__,
        f"{counts.total:,}",
        f"{counts.trainable:,}",
        100 * counts.trainable / max(counts.total, 1),
        cfg.method.type,
    )
    if fused := fused_ops.apply(model, cfg.training, counts.total, rt.device):
        log.info("%d norms and MLP gates run compiled kernels (fused_ops)", fused)
    if cfg.training.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    train_module: nn.Module = model
    if sharded:
        shard(model, cfg, config, rt, standing_in)
    elif rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_module = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    loaded = {
        "parameterBytes": local_bytes(model),
        "peakRssBytesBeforeModel": before,
        "peakRssBytesAtLoad": peak_rss_bytes(),
    }
    log.info(
        "model ready on %d rank(s): %.1f MiB of parameters and %.1f MiB peak RSS on rank 0",
        rt.world_size,
        loaded["parameterBytes"] / 2**20,
        loaded["peakRssBytesAtLoad"] / 2**20,
    )
    return Prepared(model, train_module, sharded, counts, backend, loaded)
