"""The model: loading it and its tokenizer, applying the fine-tuning method, and spreading it over ranks.

Precision: the frozen base of a PEFT method is loaded in the compute dtype (bf16/fp16) and its trainable
adapter kept in fp32; full fine-tuning keeps fp32 master weights. bf16/fp16 compute runs under autocast
(and, with FSDP2, a matching MixedPrecisionPolicy so all-gathers move half the bytes).

Distribution: PEFT methods and unsharded full fine-tuning are replicated with DDP; full fine-tuning over more
than one process is sharded with FSDP2 `fully_shard` per decoder layer and at the root (unless
`method.full.sharding` is ddp).

Seeding: the caller seeds torch before `build` so adapters start identical on every rank and across retries.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import attention
from .config import MethodConfig, ModelConfig, TrainerConfig
from .errors import PermanentError
from .runtime import Runtime

log = logging.getLogger(__name__)

HF_PREFIX = "hf://"
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
    """Where from_pretrained should look, and the arguments every load shares."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.source.startswith(HF_PREFIX):
        kwargs.update(revision=cfg.revision, cache_dir=cfg.cache_dir, token=os.environ.get("HF_TOKEN") or None)
        return cfg.source[len(HF_PREFIX) :], kwargs
    path = Path(cfg.source)
    if not path.is_dir():
        raise PermanentError(f"model.source {cfg.source}: no such directory (use hf://<id> for a hub model)")
    if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
        raise PermanentError(f"model.ggufFile {cfg.gguf_file}: not found in {cfg.source}")
    return str(path), kwargs


@contextmanager
def _local_errors_are_permanent(cfg: ModelConfig, what: str) -> Iterator[None]:
    """A local directory that cannot be loaded will not load on a retry either (a hub outage might pass)."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if cfg.source.startswith(HF_PREFIX):
            raise
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


def load_model(cfg: TrainerConfig, config: Any, device: torch.device, backend: attention.Backend | None) -> Any:
    from transformers import AutoModelForCausalLM

    where, kwargs = source_kwargs(cfg.model)
    method = cfg.method.type
    dtype = compute_dtype(cfg.training.precision)
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
        load_dtype = qdtype
    else:
        # A frozen base needs no fp32 master copy; trained weights do.
        load_dtype = dtype if (cfg.method.is_peft and dtype is not None) else torch.float32
    implementation = attention.register(backend) if backend else "sdpa"
    with _local_errors_are_permanent(cfg.model, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=load_dtype, attn_implementation=implementation, **kwargs
        )
    model.config.use_cache = False
    return model if method == "qlora" else model.to(device)


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


@dataclass
class Prepared:
    model: nn.Module  # the model as built (PEFT wrapper or base); what is saved and exported
    train_module: nn.Module  # what the loop calls: DDP-wrapped, FSDP-sharded or the model itself
    sharded: bool
    counts: ParamCounts
    packed_attention: attention.Backend | None  # None: padded batches


def uses_fsdp(cfg: TrainerConfig, world_size: int) -> bool:
    return not cfg.method.is_peft and world_size > 1 and cfg.method.full.sharding != "ddp"


def build(cfg: TrainerConfig, tokenizer: Any, rt: Runtime, packed: bool) -> Prepared:
    config = load_config(cfg.model)
    backend = attention_backend(cfg, config, rt.device, packed)
    base = load_model(cfg, config, rt.device, backend)
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
    if cfg.training.compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    sharded = uses_fsdp(cfg, rt.world_size)
    if sharded:
        return Prepared(shard_with_fsdp(model, compute_dtype(cfg.training.precision)), model, True, counts, backend)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return Prepared(model, ddp, False, counts, backend)
    return Prepared(model, model, False, counts, backend)
