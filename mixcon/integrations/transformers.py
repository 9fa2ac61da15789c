"""MixCon models as Hugging Face `transformers` models (`pip install mixcon[hf]`, transformers >= 5).

Importing this module registers the model type "mixcon" with `AutoConfig` and `AutoModelForCausalLM`, so
that a directory written by `MixConHFForCausalLM.save_pretrained` loads with
`AutoModelForCausalLM.from_pretrained(path)`, and `generate` (greedy, sampling, beam search), `pipeline` and
the Trainer work as for any causal LM. The MixCon model itself is `.model` (a `MixConForCausalLM`), the
cache is `MixConCache`; `MixConHFForCausalLM.from_mixcon` wraps a model, run or checkpoint of this
library, `hf_tokenizer` gives its tokenizer as a `PreTrainedTokenizerFast`, and `export_hf` writes both as
one directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils.hub import convert_file_size_to_int

import mixcon
from mixcon.config import MixConConfig
from mixcon.data.tokenizer import EOS, PAD, AnyTokenizer, load_tokenizer
from mixcon.generation.cache import MixConCache
from mixcon.generation.generate import generation_cache
from mixcon.io import locked_directory
from mixcon.layers.linear import Linear
from mixcon.models.files import (
    CONFIG_NAME,
    HF_MODEL_TYPE,
    HF_NAMES,
    INCOMPLETE_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    remove_stale_weights,
    wrapped_config,
)
from mixcon.models.mixcon import MixConForCausalLM
from mixcon.models.padding import ends_in_padding
from mixcon.ops.cross_entropy import IGNORE
from mixcon.training.checkpoint import (
    latest_checkpoint,
    load_model_and_tokenizer,
    model_directory,
    model_tokenizer,
    publish_directory,
)
from mixcon.training.distributed import checkpoint_layers

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"mixcon.integrations.transformers needs transformers >= 5, found {transformers.__version__}: "
                      "pip install 'mixcon[hf]'")


DERIVED = {"num_hidden_layers": "n_layers"}  # read only
SYNCED = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")  # also kept as attributes
# MixConConfig's own names, but vocab_size (a property) and top_k (transformers takes a config attribute of that
# name for a generation parameter; num_experts_per_tok reads and sets it)
NATIVE = {name: name for name in MixConConfig.field_names() - {"vocab_size", "top_k"}}
FIELDS = {**NATIVE, **HF_NAMES}  # every name whose setting writes a MixConConfig field
SETTERS = {*FIELDS, "vocab_size", "top_k", "num_hidden_layers"}  # the keywords that set (or must agree with) one

REMOTE_CODE_MODULE = "modeling_mixcon"
REMOTE_CODE = f'''"""This model's code is the mixcon library's (`pip install "mixcon[hf]"`): this file lets transformers
load it with trust_remote_code=True in a program that does not import mixcon itself."""

from {__name__} import MixConHFConfig, MixConHFForCausalLM

__all__ = ["MixConHFConfig", "MixConHFForCausalLM"]
'''
# Why a forward that recomputes its layers in the backward keeps no cache.
RECOMPUTING = ("training with activation checkpointing (the layers recomputed in the backward would advance it a "
               "second time)")
AUTO_MAP = {"AutoConfig": f"{REMOTE_CODE_MODULE}.MixConHFConfig",
            "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.MixConHFForCausalLM"}


class MixConHFConfig(PretrainedConfig):
    """A `MixConConfig` (validated, stored whole under `mixcon`) as a transformers config.
    MixConConfig fields given as keywords (`MixConHFConfig(d_model=512)`, or a config.json that
    `MixConForCausalLM.save_pretrained` wrote) set those fields, over `mixcon` when both are given; so do
    transformers' names of them (`hidden_size`, `num_attention_heads`, `num_key_value_heads`, `num_local_experts`,
    `num_experts_per_tok`, `tie_word_embeddings`), which also read them (`num_hidden_layers` reads the number
    of layers; set n_blocks and layers_per_block instead). Every field reads and sets through the config
    (`config.conba_kernel = "triton"` before a model is built from it; `from_pretrained(path, conba_chunk=32)`).
    `use_cache`: whether forwards return a cache by default; `output_router_logits`: whether outputs carry
    `aux_loss` and `router_logits`, and an evaluating (eval mode) model's loss the router losses (as in Mixtral;
    a training model's loss includes them either way)."""

    model_type = HF_MODEL_TYPE
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "aux_loss"]

    def __init__(self, mixcon: MixConConfig | dict[str, Any] | None = None, use_cache: bool = True,
                 output_router_logits: bool = False, **kwargs: Any) -> None:
        config = wrapped_config(mixcon or {}, {key: kwargs.pop(key) for key in list(kwargs) if key in SETTERS})
        self.mixcon = config.to_dict()  # config.json's "mixcon" (HF_MODEL_TYPE) entry: from_pretrained reads it
        self.use_cache = use_cache
        self.output_router_logits = output_router_logits
        super().__init__(**kwargs, **{name: getattr(config, FIELDS[name]) for name in SYNCED})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' from_dict (what from_pretrained builds the config with), the MixConConfig fields among
        `kwargs` set together, over those of `config_dict` (one by one, each would be checked against the
        others' old values: conba_kernel="triton" against the saved conba_chunk before the new one is set)."""
        given = {key: kwargs.pop(key) for key in list(kwargs) if key in SETTERS}
        fields = {FIELDS.get(key, key) for key in given}
        config_dict = {**{k: v for k, v in config_dict.items() if FIELDS.get(k, k) not in fields}, **given}
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict, with transformers' names of the MixConConfig fields, `vocab_size` and
        `num_hidden_layers` beside `mixcon` (tools such as PEFT read `hidden_size` there); loading sets the same
        fields from them (`num_hidden_layers` must agree)."""
        return {**super().to_dict(), **{name: self.mixcon[field] for name, field in HF_NAMES.items()
                                        if name not in SYNCED},
                "vocab_size": self.vocab_size, "num_hidden_layers": self.num_hidden_layers}

    def __eq__(self, other: object) -> bool:  # the MixConConfig too (transformers' fields alone miss it)
        return isinstance(other, MixConHFConfig) and self.to_dict() == other.to_dict()

    def __getattr__(self, name: str) -> Any:  # only names that ordinary lookup did not find
        if (name in FIELDS or name in DERIVED) and "mixcon" in self.__dict__:
            return getattr(self.to_mixcon(), FIELDS.get(name) or DERIVED[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DERIVED and "mixcon" in self.__dict__ and value == getattr(self, name):
            return  # (`update(config.to_dict())`)
        if name in DERIVED:
            raise AttributeError(f"{name} follows the MixConConfig ({DERIVED[name]}); set n_blocks and "
                                 "layers_per_block in `mixcon` instead")
        if name in FIELDS and "mixcon" in self.__dict__:
            self.mixcon = MixConConfig.from_dict({**self.mixcon, FIELDS[name]: value}).to_dict()
            for synced in SYNCED:  # the attribute transformers reads for the same field (tie_embeddings')
                if FIELDS[synced] == FIELDS[name]:
                    super().__setattr__(synced, value)
            return
        super().__setattr__(name, value)

    def to_mixcon(self) -> MixConConfig:
        return MixConConfig.from_dict(self.mixcon)

    def to_json_file(self, json_file_path: str | Path, use_diff: bool = True) -> None:
        """transformers' config.json, and beside it the `modeling_mixcon.py` its `auto_map` names: whatever
        saves this config (save_pretrained of the model or the config, with push_to_hub too; the Trainer's
        checkpoints; a merged PEFT model) writes a directory that loads with trust_remote_code=True wherever
        mixcon is installed."""
        self.auto_map = AUTO_MAP
        super().to_json_file(json_file_path, use_diff=use_diff)
        (Path(json_file_path).parent / f"{REMOTE_CODE_MODULE}.py").write_text(REMOTE_CODE)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """Nothing: `to_json_file` (every save of this config) writes this library's remote code (transformers
        would copy this module's file into every saved directory, under the name transformers.py)."""

    @property
    def vocab_size(self) -> int:
        return self.mixcon["vocab_size"]

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:  # transformers' resize_token_embeddings sets it
        self.mixcon = MixConConfig.from_dict({**self.mixcon, "vocab_size": value}).to_dict()


def _place(place: Any) -> str:
    """A device_map value as one name per place: 0, "cuda:0" and torch.device("cuda", 0) alike; "disk" as it is."""
    if place == "disk":
        return place
    device = torch.device("cuda", place) if isinstance(place, int) else torch.device(place)
    return str(device if device.index is not None or device.type == "cpu" else torch.device(device.type, 0))


def _check_device_map(device_map: dict[str, Any] | None) -> None:
    """A `device_map` that offloads weights (to "disk", or to the CPU beside accelerators) or splits the model across
    accelerators is refused: Conba layers and cached decoding read weights outside the module forwards that
    accelerate's hooks wrap, and a cache lives on one device."""
    named = {name: _place(place) for name, place in (device_map or {}).items()}
    places = sorted(set(named.values()))
    if len(places) > 1 or "disk" in places:
        where = {place: [name or "(the whole model)" for name, p in named.items() if p == place] for place in places}
        raise ValueError("MixConHFForCausalLM runs on one device, its weights in memory; the device_map put it on "
                         + "; ".join(f"{place} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
                                     for place, names in where.items())
                         + ". Give one device memory for the whole model (max_memory), or load without device_map "
                           "and move the model with .to(device)")


# New tokens transformers' generate makes when given neither max_new_tokens nor max_length (its generation
# config's default max_length, counted after the prompt).
DEFAULT_NEW_TOKENS = 20
# What transformers' generate hands every forward for its own use (stop_strings' tokenizer, assisted decoding).
PASSED_BY = frozenset({"tokenizer", "assistant_tokenizer"})
# DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s document bounds, for flash-attention kernels: the
# forward reads cu_seq_lens_q as seq_idx and the others as the same bounds.
FLASH_BOUNDS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
# generate's options that need a cache cropped back to an earlier length (rejected draft tokens) or transformers'
# Cache interface: a Conba state cannot un-read tokens.
CROPPING = {"assistant_model": "assisted (speculative) decoding", "prompt_lookup_num_tokens": "prompt lookup decoding",
            "assistant_early_exit": "self-speculative (early exit) decoding",
            "prefill_chunk_size": "chunked prefill (not needed: a long prompt's Conba layers run in segments and "
                                  "attention masks per block of queries, in memory linear in its length)"}


class MixConHFForCausalLM(PreTrainedModel, GenerationMixin):
    """`MixConForCausalLM` behind transformers' interface: `labels` are the inputs (shifted inside, -100 =
    ignored), `past_key_values` a `MixConCache` (made by a first call with `use_cache`, the default), the loss
    the model's (language modelling + router losses; in eval mode without `output_router_logits`, language
    modelling only); `aux_loss` the router's load-balancing loss and
    `router_logits` each MoE layer's (B·T, n_experts), with `output_router_logits` (forward argument or config;
    as in Mixtral)."""

    config_class = MixConHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules: ClassVar[list[str]] = ["MixConLayer"]
    accepts_loss_kwargs = True  # the Trainer passes `num_items_in_batch` (gradient accumulation = one big batch)
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # attention runs through scaled_dot_product_attention (attn_implementation="sdpa")

    def __init__(self, config: MixConHFConfig, model: MixConForCausalLM | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else MixConForCausalLM(config.to_mixcon())
        self.gradient_checkpointing = False
        self._lengths: tuple[int | None, int | None] | None = None  # (max_new_tokens, max_length) while generating
        self.post_init()
        if self.generation_config is not None:  # a prompt-less generate starts as training documents start
            self.generation_config.bos_token_id = config.eos_token_id

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func: Callable[..., Any] | None = None,
                                    every_n_layers: int = 1) -> None:
        """transformers' activation checkpointing (`activation_checkpointing_enable`, the Trainer's
        `activation_checkpointing=True`): every `every_n_layers`-th MixCon layer is recomputed in the backward
        while training (`training.distributed.checkpoint_layers`). Reentrant checkpointing is refused: it would
        cut the router losses, which a layer returns beside its output, out of the graph."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError("activation checkpointing of MixCon layers needs use_reentrant=False (the default): "
                             "reentrant checkpointing would drop the gradient of the router losses")
        checkpoint_layers(self.model, enable, checkpoint_fn=gradient_checkpointing_func, every_n_layers=every_n_layers)
        self.gradient_checkpointing = enable

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """An embedding or linear map that transformers makes anew, not yet part of the model
        (`resize_token_embeddings(..., mean_resizing=False)`): Normal(0, init_std), as `MixConForCausalLM` starts
        its embedding and LM head. The model's own modules keep the initialisation `MixConForCausalLM` gave them
        (transformers calls this on each of them when wrapping)."""
        if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)) and all(module is not m for m in self.modules()):
            module.weight.normal_(0.0, self.config.to_mixcon().init_std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModelForCausalLM") -> None:
        """Nothing: saving the config writes this library's remote code (`MixConHFConfig.to_json_file`)."""

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' save_pretrained, then the weights of an earlier save in the other form (model.safetensors
        beside a new shard index, or an index and its shards beside a new model.safetensors) removed: transformers
        leaves them, and a directory with both would not load; and the mark of an unfinished native save there
        (`MixConForCausalLM.save_pretrained` killed between its two files), which this save replaces."""
        super().save_pretrained(save_directory, *args, **kwargs)
        saved = [Path(save_directory) / name for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)]
        if kwargs.get("is_main_process", True):
            if all(path.is_file() for path in saved):
                remove_stale_weights(Path(save_directory), keep=max(saved, key=lambda p: p.stat().st_mtime_ns).name)
            (Path(save_directory) / INCOMPLETE_NAME).unlink(missing_ok=True)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a MixConCache, made in `forward`

    @classmethod
    def from_mixcon(cls, model: MixConForCausalLM | str | Path, device: str = "cpu",
                    dtype: torch.dtype | str | None = torch.float32) -> MixConHFForCausalLM:
        """Wrap a `MixConForCausalLM` (sharing its parameters), or load one from a run directory, a
        checkpoint or a `MixConForCausalLM.save_pretrained` directory, in `dtype` ("auto" or None: the saved one;
        a model given is wrapped as it is, a loaded one in eval mode); the wrapper takes the model's mode."""
        if not isinstance(model, MixConForCausalLM):
            model = MixConForCausalLM.from_pretrained(model_directory(model), device=device, dtype=dtype)
        config = MixConHFConfig(model.config)
        config.bos_token_id = config.eos_token_id  # what begins a text, as in training (`hf_tokenizer`'s bos_token)
        return cls(config, model).train(model.training)  # (the wrapper's own flag picks its loss)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, with every CPU parameter copied out of the safetensors file it
        may still be a view of: an unaligned view changes the BLAS kernels' rounding, and the logits
        would then differ from the saved model's in the last bit."""
        model, info = super().from_pretrained(*args, **{**kwargs, "output_loading_info": True})
        _check_device_map(getattr(model, "hf_device_map", None))
        with torch.no_grad():
            for param in model.parameters():  # tied parameters once: they stay tied
                if param.device.type == "cpu":
                    param.data = param.data.clone()
        model._init_missing(info["missing_keys"])
        return (model, info) if kwargs.get("output_loading_info") else model

    @torch.no_grad()
    def _init_missing(self, missing: set[str]) -> None:
        """Parameters the weights files lacked (transformers made them, uninitialised, or left a tied one on the
        meta device): MixCon's initialisation of their modules (`MixConForCausalLM.init_module`), the loaded
        parameters of those modules kept."""
        missing = set(missing) | self._materialise_meta()
        prefix = f"{self.base_model_prefix}."
        for owner in sorted({key.rpartition(".")[0] for key in missing if key.startswith(prefix)}):
            module = self.get_submodule(owner)
            kept = {name: param.clone() for name, param in module.named_parameters()
                    if f"{owner}.{name}" not in missing}
            self.model.init_module(owner[len(prefix):], module)
            for name, value in kept.items():
                module.get_parameter(name).copy_(value)

    def _materialise_meta(self) -> set[str]:
        """Parameters still on the meta device (a tied embedding absent from the files, which transformers does
        not count as missing) made real, each once where it is tied; returns their names."""
        device = next((p.device for p in self.parameters() if not p.is_meta), torch.device("cpu"))
        fresh: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}  # id -> (meta, its replacement)
        names = set()
        for module_name, module in self.named_modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in fresh:
                    fresh[id(param)] = (param, torch.nn.Parameter(torch.empty_like(param, device=device),
                                                                  requires_grad=param.requires_grad))
                    names.add(f"{module_name}.{name}")
                setattr(module, name, fresh[id(param)][1])
        return names

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        """The new embedding, and its number of rows as `vocab_size` of both configs (`resize_token_embeddings`)."""
        self.config.vocab_size = value.num_embeddings
        self.model.config = self.model.config.replace(vocab_size=value.num_embeddings)
        self.model.embed = value

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        """The LM head's new weight, kept in MixCon's `Linear` (its fused few-row products when decoding)."""
        head = Linear(value.in_features, value.out_features, bias=False, device="meta")
        head.weight = value.weight
        self.model.lm_head = head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MixConCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast | tuple[Any, ...]:
        """input_ids (B, T): the new tokens after `past_key_values`; attention_mask (B, T) or (B, past + T),
        1 for real tokens; labels (B, T) the inputs themselves (the next token is each position's target).
        By default no cache is made with labels or while autograd records the forward (training); use_cache=True
        makes one then too (gradients flow through cached forwards). None is made, and use_cache=True is refused,
        for rows that end in padding (which generate would continue after the pads), packed documents, or while
        training with activation checkpointing. The loss: language modelling, plus the router losses while
        training or with `output_router_logits` (an evaluation's loss is the language model's). Packed documents
        (padding-free batches, `DataCollatorWithFlattening`): `seq_idx` (B, T), `position_ids` (B, T)
        that restart where a document starts, or the cumulative lengths `cu_seq_lens_q` of one row's documents
        (`return_flash_attn_kwargs=True`); no cache is made then. Otherwise position_ids are not
        needed: positions follow from the attention mask and the cache. `output_hidden_states`: the embeddings
        and every layer's output, the last after the final norm (as transformers' models give them).
        `inputs_embeds` (B, T, hidden_size) in place of input_ids (PEFT's prompt tuning, soft prompts).
        `num_items_in_batch` (the Trainer's count of labels over the micro-batches of an optimizer step): the loss
        is then this batch's summed token losses over it, the router losses weighted by this batch's share of the
        tokens, so that gradient accumulation equals one big batch."""
        unsupported = sorted(k for k, v in kwargs.items()
                             if v is not None and v is not False and k not in PASSED_BY | FLASH_BOUNDS)
        if unsupported:
            raise ValueError(f"MixConHFForCausalLM.forward does not take {unsupported}; it takes input_ids, "
                             "attention_mask, past_key_values, labels, use_cache, logits_to_keep, return_dict, "
                             "position_ids, seq_idx, output_router_logits, output_hidden_states, inputs_embeds, "
                             "num_items_in_batch")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give input_ids (B, T) or inputs_embeds (B, T, hidden_size): one of them")
        if past_key_values is not None and not isinstance(past_key_values, MixConCache):
            raise TypeError(f"past_key_values must be a MixConCache (or None), got {type(past_key_values).__name__}")
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if past_key_values is None and attention_mask is not None and attention_mask.shape[1] > T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but input_ids {T}, and no "
                             "past_key_values holds the earlier ones (no cache is made for right-padded rows: "
                             "generate needs left padding)")
        mask = None if attention_mask is None else attention_mask[:, -T:].bool()
        bounds = kwargs.get("cu_seq_lens_q")
        if bounds is not None:
            if seq_idx is not None:
                raise ValueError("give packed documents as seq_idx or as cu_seq_lens_q, not both")
            if kwargs.get("cu_seq_lens_k") is not None and not torch.equal(kwargs["cu_seq_lens_k"], bounds):
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: a document's queries attend to its own keys")
            seq_idx, source = _documents_from_bounds(bounds, (B, T)), "cu_seq_lens_q"
        elif seq_idx is None and position_ids is not None and T > 1:  # (decoding steps pass one position a row)
            seq_idx, source = _documents_from_positions(position_ids, (B, T), mask), "position_ids restart inside a row"
        else:
            source = None
        if source is not None and seq_idx is not None:
            if past_key_values is not None:
                raise ValueError(f"{source} (packed documents), which take no past_key_values: each document starts "
                                 "from nothing")
            if mask is not None and not bool(mask.all()):
                raise ValueError(f"{source} (packed documents), which cannot be combined with padding "
                                 "(attention_mask zeros): pack without pads, or pad without packing")
        recomputing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if recomputing and past_key_values is not None:
            raise ValueError(f"past_key_values: no cache while {RECOMPUTING}")
        cache = past_key_values
        wants_cache = use_cache if use_cache is not None else (  # by default: not for training forwards
            self.config.use_cache and labels is None and not self.model._needs_grad())
        if cache is None and wants_cache:
            no_cache = (RECOMPUTING if recomputing else
                        "packed documents (seq_idx, or position_ids that restart inside a row)" if seq_idx is not None
                        else "rows that end in padding (left-pad them)"
                        if mask is not None and bool(ends_in_padding(mask).any()) else None)
            if no_cache is None:
                cache = (self.model.new_cache(B, max_length=T) if self._lengths is None  # a forward's own
                         else generation_cache(self.model, B, T, self._generation_room(T)))
            elif use_cache:
                raise ValueError(f"use_cache=True: no cache is made for {no_cache}; pass use_cache=False")
        if attention_mask is not None:
            attention_mask = attention_mask[:, -T:]  # generate passes the mask of the whole sequence so far
        targets = None
        if labels is not None:
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
            if seq_idx is not None:  # a document's last token does not predict the next document's first
                ends = torch.nn.functional.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (0, 1), value=False)
                targets = targets.masked_fill(ends, IGNORE)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        out = self.model(input_ids, labels=targets, attention_mask=attention_mask, cache=cache,
                         logits_to_keep=logits_to_keep, seq_idx=seq_idx, output_hidden_states=output_hidden_states,
                         inputs_embeds=inputs_embeds, output_router_logits=bool(output_router_logits))
        loss = out.loss if self.training or output_router_logits else out.lm_loss
        if loss is not None and num_items_in_batch is not None:  # the mean over this batch's scored tokens ->
            scored = targets != IGNORE  # their sum over the step's count (pads score nothing: see the model)
            loss = loss * ((scored if mask is None else scored & mask).sum() / num_items_in_batch)
        result = MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss if output_router_logits else None,
                                           logits=out.logits, past_key_values=cache, hidden_states=out.hidden_states,
                                           router_logits=out.router_logits)
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return result if use_dict else result.to_tuple()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate`, from the prompt, on left-padded rows: a `MixConCache` from an earlier call
        cannot be continued here (it lacks transformers' `Cache` interface); continue one with `forward`. A prompt
        given as `inputs_embeds` (B, T, hidden_size) returns the new tokens only (with input_ids too, both)."""
        if isinstance(kwargs.get("past_key_values"), MixConCache):
            raise ValueError("past_key_values: generate starts from the prompt and makes its own cache; pass the "
                             "whole sequence as input_ids (a MixConCache continues through forward calls)")
        mask = kwargs.get("attention_mask")
        if mask is not None and bool(ends_in_padding(mask.bool()).any()):
            raise ValueError("attention_mask: generate continues each row after its last token, so rows must be "
                             "left-padded (tokenizer padding_side='left', as hf_tokenizer sets it)")
        passed = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)

        def setting(name: str) -> Any:  # as transformers merges them: keyword, else the passed config, else the model's
            return next((v for v in (kwargs.get(name), getattr(passed, name, None),
                                     getattr(self.generation_config, name, None)) if v is not None), None)

        for name, what in CROPPING.items():
            if setting(name) is not None:
                raise ValueError(f"{name}: MixConHFForCausalLM does not support {what}; its cache cannot be cropped "
                                 "back to an earlier length (a Conba state cannot un-read tokens)")
        self._lengths = (setting("max_new_tokens"), setting("max_length"))
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._lengths = None

    def _generation_room(self, prompt_length: int) -> int:
        """Positions a cache made for a `prompt_length` prompt keeps for new tokens: what the running `generate`
        asks for (max_new_tokens, else max_length less the prompt, else transformers' default), so that the cache
        need not grow."""
        assert self._lengths is not None, "only while generate runs"
        max_new_tokens, max_length = self._lengths
        if max_new_tokens is None and max_length is None:
            return DEFAULT_NEW_TOKENS
        if max_new_tokens is None:
            return max(0, max_length - prompt_length)
        return max_new_tokens

    def _reorder_cache(self, cache: MixConCache, beam_idx: torch.Tensor) -> MixConCache:
        """Beam search: the cache rows of the kept beams, in their order."""
        cache.select_rows(beam_idx.to(cache.key_mask.device))
        return cache


def _documents_from_bounds(cu_seq_lens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """seq_idx (1, T) of packed documents from their cumulative lengths [0, n_1, n_1 + n_2, ..., T] (one row)."""
    B, T = shape
    if B != 1 or cu_seq_lens.dim() != 1 or len(cu_seq_lens) < 2 or int(cu_seq_lens[0]) != 0 \
            or int(cu_seq_lens[-1]) != T or bool((cu_seq_lens[1:] < cu_seq_lens[:-1]).any()):
        raise ValueError(f"cu_seq_lens_q must be the cumulative document lengths [0, ..., T={T}] of one packed row "
                         f"(input_ids (1, T)); got {cu_seq_lens.tolist()} for input_ids {tuple(shape)}")
    steps = torch.arange(T, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:-1].to(steps.dtype), steps, right=True)[None]


def _documents_from_positions(position_ids: torch.Tensor, shape: tuple[int, int],
                              mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """seq_idx (B, T) of packed documents from position ids that restart at each, between real tokens
    (`mask`: pads, whose positions transformers fills in, break nothing); None if they never do."""
    if position_ids.shape != shape:
        raise ValueError(f"position_ids must have the shape of input_ids {shape}, got {tuple(position_ids.shape)}")
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (B, T - 1)
    if mask is not None:
        restarts &= mask[:, 1:] & mask[:, :-1]
    if not bool(restarts.any()):
        return None
    return torch.nn.functional.pad(restarts.long().cumsum(1), (1, 0))


def hf_tokenizer(tokenizer: AnyTokenizer | str | Path, split_special_tokens: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer of this library (BPE or bytes; or a spec `load_tokenizer` reads: 'bytes', a tokenizer.json,
    a directory holding one; or a run, checkpoint or `save_pretrained` directory: its model's tokenizer, as
    `from_mixcon` loads its model) as a `PreTrainedTokenizerFast` with the same ids that
    starts every text with EOS, as training documents start: its `bos_token` is EOS (as GPT-2's), the token a
    tool that prepends `bos_token` should prepend. Text that spells a special token (`tok.eos_token`,
    or one added with `add_special_tokens`) encodes as its id, as transformers' tokenizers do;
    `split_special_tokens=True` encodes it as ordinary text, as this library reads training data."""
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer = load_tokenizer(tokenizer)
        except FileNotFoundError:
            if not Path(tokenizer).is_dir():
                raise
            directory = model_directory(tokenizer)  # a model's directory: its tokenizer
            tokenizer = model_tokenizer(directory, MixConConfig.load(directory / CONFIG_NAME).vocab_size)
    backend = tokenizer.to_tokenizers()
    backend.encode_special_tokens = split_special_tokens
    backend.post_processor = TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A $B:1",
                                                special_tokens=[(EOS, tokenizer.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", split_special_tokens=split_special_tokens)


def model_card(model: MixConForCausalLM, source: str | Path, out: str | Path) -> str:
    """The README.md of an export: Hub metadata, the model's layout and size, and how to load it."""
    summary = model.summary().splitlines()
    return f'''---
library_name: mixcon
pipeline_tag: text-generation
tags: [mixcon, conba, state-space-model, mixture-of-experts]
---

# MixCon model

Exported by mixcon {mixcon.__version__} from `{source}`.

{summary[0]}; {summary[1]}; {summary[-1]}.

```python
import mixcon.integrations.transformers  # registers the "mixcon" model type (pip install "mixcon[hf]")
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({str(out)!r})  # starts every text with EOS, as in training
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
batch = tokenizer(["def "], return_tensors="pt")
print(tokenizer.batch_decode(model.generate(**batch, max_new_tokens=20), skip_special_tokens=True))
```

Without the first import, pass `trust_remote_code=True` to both `from_pretrained` calls: the model then
loads through the bundled `{REMOTE_CODE_MODULE}.py`, which imports mixcon.
'''


def export_hf(checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
              dtype: torch.dtype | None = None, max_shard_size: int | str = "50GB", overwrite: bool = False) -> Path:
    """Write a run, checkpoint or model directory of this library (and its tokenizer, or `tokenizer`) as one
    transformers directory: `save_pretrained`'s config.json, model.safetensors and generation_config.json,
    the `hf_tokenizer` files, modeling_mixcon.py (named by the config's `auto_map`) and a model card, so that
    `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained(out)` load it once this module is imported, or
    wherever mixcon is installed with `trust_remote_code=True` (given to both); this library's loaders load it
    too. The model's EOS and padding ids must be the tokenizer's (a model without them takes the tokenizer's).
    Weights over `max_shard_size` are sharded as transformers shards them. Written beside `out`,
    then renamed into place; an `out` that is a file, or the source's directory, inside it or holding it, is
    refused before anything is read."""
    out = Path(out).resolve() if Path(out).is_symlink() else Path(out)  # a link's target is what gets replaced
    max_shard_size = _shard_bytes(max_shard_size)
    _check_export_directory(out, Path(checkpoint), overwrite)
    model, tok = load_model_and_tokenizer(checkpoint, tokenizer=tokenizer, dtype=dtype)
    model.config = _tokenizer_special_ids(model.config, tok)
    out.parent.mkdir(parents=True, exist_ok=True)

    def refuse(pid: str) -> None:
        raise ValueError(f"{out} is being written by another export (pid {pid}); wait for it to end, or choose "
                         "another --out") from None

    with locked_directory(out.with_name(f".lock-{out.name}"), refuse, transient=True):  # one writer of `out`
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export
        try:
            MixConHFForCausalLM.from_mixcon(model).save_pretrained(tmp, max_shard_size=max_shard_size)
            hf_tokenizer(tok).save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(model, checkpoint, out))
            publish_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind; `out` is as it was
            raise
    return out


def _tokenizer_special_ids(config: MixConConfig, tok: AnyTokenizer) -> MixConConfig:
    """The model's EOS and padding ids, taken from the tokenizer where the config has none (a model built by
    hand); ids that name other tokens than the tokenizer's are refused: generation would stop on the wrong one."""
    ids = {}
    for field, name in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):  # (bos is EOS in an export)
        own, theirs = getattr(config, field), getattr(tok, name)
        if own is None:
            ids[field] = theirs
        elif own != theirs:
            raise ValueError(f"the model's {field}={own} is not the tokenizer's {name}={theirs} ({tok.name}): "
                             "exported together, generation would stop or pad on the wrong token; export with the "
                             "tokenizer the model was trained with, or set the model's ids to the tokenizer's")
    return config.replace(**ids) if ids else config


def _shard_bytes(max_shard_size: int | str) -> int:
    """`max_shard_size` as a positive byte count ("5GB", "500MiB" or an int), checked before anything is read."""
    error = (f"max_shard_size={max_shard_size!r} (--max-shard-size) must be a positive number of bytes: an integer "
             "or one followed by a unit, e.g. 5GB, 500MB or 2GiB")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int | str):
        raise ValueError(error)
    try:
        size = convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ValueError(error) from None
    if size <= 0:
        raise ValueError(error)
    return size


def _check_export_directory(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse an `out` that is not a directory, a non-empty one without `overwrite`, or one that is, is inside
    or holds the `checkpoint` given or the checkpoint it reads (a run's latest): replacing it would lose it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} (--out) exists and is not a directory; name a directory to write")
    target = out.resolve()
    for source in [p.resolve() for p in (latest_checkpoint(checkpoint), checkpoint) if p is not None]:
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            where = "is" if target == source else "is inside" if target.is_relative_to(source) else "holds"
            raise ValueError(f"out={str(out)!r} (--out) {where} {source}, which the export reads: writing there "
                             "would replace it; name a directory outside it")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty directory; pass overwrite=True (--overwrite) "
                              "to replace it")


AutoConfig.register(MixConHFConfig.model_type, MixConHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MixConHFConfig, MixConHFForCausalLM, exist_ok=True)
