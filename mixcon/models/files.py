"""A model directory on disk: config.json (a MixConConfig, or the transformers wrapper's config holding one) and
safetensors weights, in one file or in shards named by an index, as transformers writes them."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixcon.config import MixConConfig
from mixcon.io import write_atomic, write_text_atomic

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # of a sharded model: which shard holds each tensor
CONFIG_NAME = "config.json"
HF_MODEL_TYPE = "mixcon"  # the transformers wrapper's model_type; its config.json holds the MixConConfig under it
# transformers' names of MixConConfig fields, which the wrapper's config.json also carries at its top level
HF_NAMES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
            "num_local_experts": "n_experts", "num_experts_per_tok": "top_k", "tie_word_embeddings": "tie_embeddings"}
# Safetensors metadata of weights whose stacked MoE experts are stored (n, out, in), like nn.Linear's; files
# without it hold them (n, in, out), as mixcon wrote them before.
LAYOUT_KEY = "mixcon_expert_layout"
WEIGHTS_METADATA = {"format": "pt", LAYOUT_KEY: "out_in"}
EXPERT_WEIGHTS = (".w_gate_up", ".w_down")
# Present while `write_model` replaces a directory's weights and config: a save that dies between the two leaves it.
INCOMPLETE_NAME = ".mixcon-save-incomplete"


def upgrade_expert_layout(state: dict[str, Any], metadata: dict[str, str] | None) -> dict[str, Any]:
    """`state` (parameter name -> tensor, or -> optimizer state of that parameter) as this version stores it:
    the stacked experts of weights saved without WEIGHTS_METADATA's layout are transposed to (n, out, in), unless
    their shapes show this layout already (d_model from `embed.weight`: a file that another tool wrote)."""
    if (metadata or {}).get(LAYOUT_KEY) == WEIGHTS_METADATA[LAYOUT_KEY]:
        return state
    embed = state.get("embed.weight")
    d = embed.shape[-1] if isinstance(embed, torch.Tensor) else None

    def swap(value: Any, down: bool) -> Any:
        if isinstance(value, dict):
            return {k: swap(v, down) for k, v in value.items()}
        if not (isinstance(value, torch.Tensor) and value.dim() == 3):
            return value
        out, inp = value.shape[-2:]
        if d is not None and (out, inp).count(d) == 1 and (out == d) == down:  # (n, out, in) already
            return value
        return value.transpose(-1, -2).contiguous()

    return {k: swap(v, k.endswith(".w_down")) if k.endswith(EXPERT_WEIGHTS) else v for k, v in state.items()}


def read_weights(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, str] | None]:
    """A safetensors file's tensors in this version's layout (`upgrade_expert_layout`), and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with readable_weights(path):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        return upgrade_expert_layout(load_file(str(path), device=str(device)), metadata), metadata


@contextlib.contextmanager
def readable_weights(path: str | Path) -> Iterator[None]:
    """Turn safetensors' error for a truncated or foreign file into a ValueError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def wrapped_config(base: MixConConfig | dict[str, Any], top: dict[str, Any]) -> MixConConfig:
    """The transformers wrapper's MixConConfig: `base` (its config.json's "mixcon" entry) with the fields that `top`
    names set over it, by transformers' names or MixConConfig's (`MixConHFConfig`'s keywords; the top level of its
    config.json); `num_hidden_layers` there must agree, unless a layout is given beside it."""
    names = {**{name: name for name in MixConConfig.field_names()}, **HF_NAMES}
    config = base if isinstance(base, MixConConfig) else MixConConfig.from_dict(base)
    if fields := {names[key]: value for key, value in top.items() if key in names}:
        config = config.replace(**fields)
    layers = top.get("num_hidden_layers")  # (`{**to_dict(), "n_blocks": 1}`: the layout wins)
    if layers is not None and layers != config.n_layers and not {"n_blocks", "layers_per_block"} & set(fields):
        raise ValueError(f"num_hidden_layers={layers} disagrees with the MixConConfig's {config.n_layers} layers "
                         f"(n_blocks={config.n_blocks} x layers_per_block={config.layers_per_block}); set those")
    return config


def read_config(directory: Path) -> tuple[MixConConfig, bool]:
    """The config.json of a model directory, and whether the transformers wrapper wrote it (the MixConConfig
    then sits under its "mixcon" entry); a ValueError naming the file when it holds no valid config."""
    path = directory / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object of config fields is expected, not {type(raw).__name__}")
        wrapped = raw.get("model_type") == HF_MODEL_TYPE and isinstance(raw.get(HF_MODEL_TYPE), dict)
        fields = raw[HF_MODEL_TYPE] if wrapped else raw
        unknown = sorted(set(fields) - MixConConfig.field_names(), key=repr)
        if unknown and "d_model" in fields:  # a MixCon config (every one has it), of fields another version added
            raise ValueError(f"fields this version of mixcon does not know: {unknown}; a model that a newer "
                             "version wrote may need them (upgrade mixcon to load it)")
        return (wrapped_config(raw[HF_MODEL_TYPE], raw) if wrapped else MixConConfig.from_dict(raw)), wrapped
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a valid model config ({e})") from e


def umask_permissions(path: Path) -> None:
    """Give a written file the permissions a plain `open` gives under the umask: safetensors writes through a
    temporary file, which leaves it readable by its owner only."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_model(model: nn.Module, config_json: str, directory: Path) -> None:
    """`model`'s weights as model.safetensors and `config_json` as config.json in `directory` (made if missing),
    each written whole or not at all; then the weights of an earlier sharded save there are removed. From before
    the weights are replaced until the config is, INCOMPLETE_NAME stands beside them: a save that dies between the
    two leaves it, and `read_model` refuses the directory (new weights under an old config could load silently)."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / INCOMPLETE_NAME
    write_text_atomic(marker, "a save_pretrained here did not finish: config.json and the weights may come from "
                              "different saves\n")
    try:
        write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_model(model, str(tmp), metadata=WEIGHTS_METADATA))
    except BaseException:
        marker.unlink()  # nothing was replaced
        raise
    umask_permissions(directory / WEIGHTS_NAME)
    write_text_atomic(directory / CONFIG_NAME, config_json)
    marker.unlink()
    remove_stale_weights(directory, keep=WEIGHTS_NAME)


def remove_stale_weights(directory: Path, keep: str) -> None:
    """Remove the weights of an earlier save in the other form, which `weight_files` would refuse beside the new:
    with `keep` WEIGHTS_NAME, a shard index and the shards it names; with WEIGHTS_INDEX_NAME, model.safetensors."""
    if keep == WEIGHTS_INDEX_NAME:
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)
        return
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return
    try:
        shards = {name for name in json.loads(index.read_text())["weight_map"].values() if isinstance(name, str)}
    except (ValueError, KeyError, TypeError, AttributeError):  # not a shard index: it names nothing to remove
        shards = set()
    index.unlink()
    for name in shards:  # file names in this directory only (an index could name any path)
        if Path(name).name == name and name.endswith(".safetensors") and name != WEIGHTS_NAME:
            (directory / name).unlink(missing_ok=True)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards its index names (as
    transformers writes models over `max_shard_size`); none when it has neither."""
    index = directory / WEIGHTS_INDEX_NAME
    if (directory / WEIGHTS_NAME).is_file():
        if index.is_file():  # which one is this model? (a sharded save over an unsharded one leaves both)
            raise ValueError(f"{directory} holds both {WEIGHTS_NAME} and {WEIGHTS_INDEX_NAME}: remove the older "
                             "save's files")
        return [directory / WEIGHTS_NAME]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(name, str) for name in shards):
                raise TypeError("shard names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{index}: not a shard index ({type(e).__name__}: {e})") from e
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory / WEIGHTS_INDEX_NAME} names shards that are missing: {missing[:3]}")
        return [directory / name for name in shards]
    return []


def read_model(directory: Path, device: torch.device | str = "cpu") -> tuple[MixConConfig, dict[str, torch.Tensor]]:
    """The config and the weights (parameter name -> tensor, on `device`, in this version's layout) of a model
    directory that `MixConForCausalLM.save_pretrained`, a training checkpoint or the transformers wrapper wrote; a
    tied model's shared tensor under both of its names."""
    from safetensors.torch import load_file

    if (directory / INCOMPLETE_NAME).exists():
        raise ValueError(f"{directory}: a save_pretrained there did not finish ({INCOMPLETE_NAME} is left): its "
                         f"{CONFIG_NAME} and weights may come from different saves; save the model again (or delete "
                         f"{INCOMPLETE_NAME} if you know they match)")
    files = weight_files(directory)
    if not (directory / CONFIG_NAME).is_file() or not files:
        raise FileNotFoundError(f"{directory}: not a MixCon model directory (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} with its shards)")
    config, wrapped = read_config(directory)
    state = {}
    for path in files:
        if wrapped:  # MixConHFForCausalLM's weights: this version's layout, under its `model.` attribute
            with readable_weights(path):
                state.update({k.removeprefix("model."): v for k, v in load_file(path, str(device)).items()})
        else:
            state.update(read_weights(path, device)[0])
    if config.tie_embeddings:  # the file holds one name of the shared tensor
        if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state.get("embed.weight",
                                                                                            state["lm_head.weight"])):
            raise ValueError(f"{directory}: its config says tie_embeddings=true, but its weights hold an "
                             "lm_head.weight other than embed.weight (an untied model's): set tie_embeddings "
                             "false in its config.json to load both")
        shared = state.get("embed.weight", state.get("lm_head.weight"))
        if shared is not None:
            state = {**state, "embed.weight": shared, "lm_head.weight": shared}
    return config, state
