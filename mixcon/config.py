"""MixConConfig: one dataclass for the whole model, validated on construction (DESIGN.md §1)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from mixcon.checks import as_integer, as_number, is_integer, is_number, within
from mixcon.io import write_text_atomic
from mixcon.ops.contract import triton_chunk_ok

MIXER_LETTERS = {"A": "attention", "C": "conba"}
FFN_LETTERS = {"D": "mlp", "M": "moe"}


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"MixConConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class MixConConfig:
    """Architecture of a MixCon language model.

    Layout: `n_blocks` blocks of `layers_per_block` (L) layers; `attn_per_block` (a) attention
    layers and c = L - a Conba layers per block; every `moe_every`-th (e) layer's MLP is an MoE of
    `n_experts` (n) experts with `top_k` (K) active. `layer_pattern` / `moe_pattern` override the
    default placement with letters per layer ("A"/"C" and "D"/"M"), either one block long (repeated
    in every block) or one letter per layer of the model.
    """

    # layout
    d_model: int = 256
    vocab_size: int = 8192
    n_blocks: int = 2
    layers_per_block: int = 8
    attn_per_block: int = 2
    conba_per_block: int | None = None  # optional; must equal layers_per_block - attn_per_block
    moe_every: int = 2
    n_experts: int = 8
    top_k: int = 2
    layer_pattern: str | None = None
    moe_pattern: str | None = None
    # attention
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    attn_rope: bool = False
    rope_theta: float = 10000.0
    # feed-forward (dense SwiGLU MLP and each expert)
    mlp_hidden: int = 640
    expert_hidden: int | None = None  # default mlp_hidden
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    # Conba (DESIGN.md §2)
    conba_expand: int = 2
    conba_head_dim: int = 64  # P
    conba_state: int = 64  # N
    conba_groups: int = 1  # G key/query groups
    conba_conv: int = 4
    conba_chunk: int = 64
    conba_selective: Literal["swiglu", "linear"] = "swiglu"
    conba_sel_hidden: int = 32
    conba_state_scaling: bool = True
    conba_control: bool = True
    conba_beta_max: float = 1.0
    conba_delay: int = 2  # tau
    conba_process_noise: float = 0.0  # sigma_w
    conba_observation_noise: float = 0.0  # sigma_v
    # "triton": forwards without autograd on CUDA (inference, prefill) run the Triton kernel
    # (ops/triton_chunk.py); everything else, and "torch", the PyTorch chunked scan.
    conba_kernel: Literal["torch", "triton"] = "torch"
    # model
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. tokenizer name)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""
        for name in ("d_model", "vocab_size", "n_blocks", "layers_per_block", "n_heads", "n_kv_heads",
                     "mlp_hidden", "n_experts", "top_k", "conba_expand", "conba_head_dim", "conba_state",
                     "conba_groups", "conba_chunk", "conba_sel_hidden"):
            self._integer(name, 1)
        self._integer("conba_conv", 2, "a causal conv width; 4 in Mamba")
        for name in ("head_dim", "expert_hidden"):
            self._integer(name, 1, optional=True)
        self._integer("moe_every", 0, "0 = no MoE")
        self._integer("conba_delay", 0, "0 = no delayed state")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            self._integer(name, 0, optional=True, maximum=self.vocab_size - 1)
        for name in ("conba_state_scaling", "conba_control", "attn_rope", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        for name in ("rope_theta", "norm_eps", "init_std"):
            self._number(name, 0.0, strict=True)
        for name in ("conba_process_noise", "conba_observation_noise", "router_aux_loss_coef",
                     "router_z_loss_coef"):
            self._number(name, 0.0, strict=False)
        self._number("conba_beta_max", 0.0, strict=True, maximum=2.0,
                     note="beta = beta_max·σ(·) stays below it; the delta rule's I - beta·k·kᵀ contracts "
                          "along k for beta < 2 (at 2 it reflects)")
        L = self.layers_per_block
        a = self.attn_per_block
        self._integer("attn_per_block", 0, maximum=L)
        if self.moe_pattern is None and self.moe_every > L:
            _fail("moe_every", self.moe_every, f"must be at most layers_per_block={L} (the MoE layers sit at block "
                  "indices i = e-1 mod e, none of which a block reaches), or 0 for no MoE")
        self._integer("conba_per_block", 0, optional=True)
        if self.conba_per_block is not None and self.conba_per_block != L - a:
            _fail("conba_per_block", self.conba_per_block,
                  f"attn_per_block + conba_per_block must equal layers_per_block={L}, so it must be {L - a}")
        if self.layer_pattern is None and a not in (0, L) and L % a != 0:
            _fail("attn_per_block", a,
                  f"must divide layers_per_block={L} for the default placement, or give layer_pattern")
        if self.top_k > self.n_experts:
            _fail("top_k", self.top_k, f"must be in [1, n_experts={self.n_experts}]")
        self._validate_pattern("layer_pattern", self.layer_pattern, MIXER_LETTERS)
        self._validate_pattern("moe_pattern", self.moe_pattern, FFN_LETTERS)
        if self.layer_pattern is not None:
            block = self.layer_pattern[:L]
            if len(self.layer_pattern) == L and block.count("A") != a:
                _fail("layer_pattern", self.layer_pattern,
                      f"has {block.count('A')} 'A' layers but attn_per_block={a}")
        # attention
        if self.n_heads % self.n_kv_heads != 0:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            _fail("n_heads", self.n_heads, f"must divide d_model={self.d_model} (or set head_dim)")
        if self.attn_rope and self.attn_head_dim % 2 != 0:
            if self.head_dim is not None:
                _fail("head_dim", self.head_dim, "must be even when attn_rope=True")
            _fail("n_heads", self.n_heads, f"must make d_model / n_heads = {self.attn_head_dim} even when "
                                           "attn_rope=True (or set an even head_dim)")
        # Conba
        if (self.conba_expand * self.d_model) % self.conba_head_dim != 0:
            _fail("conba_head_dim", self.conba_head_dim,
                  f"must divide conba_expand*d_model={self.conba_expand * self.d_model}")
        if self.conba_heads % self.conba_groups != 0:
            _fail("conba_groups", self.conba_groups, f"must divide the number of Conba heads {self.conba_heads}")
        if self.conba_selective not in ("swiglu", "linear"):
            _fail("conba_selective", self.conba_selective, "must be 'swiglu' or 'linear'")
        if self.conba_kernel not in ("torch", "triton"):
            _fail("conba_kernel", self.conba_kernel, "must be 'torch' or 'triton'")
        if self.conba_kernel == "triton" and not triton_chunk_ok(self.conba_chunk, self.conba_delay):
            _fail("conba_chunk", self.conba_chunk, f"must be a power of two >= 16 and >= conba_delay="
                  f"{self.conba_delay} with conba_kernel='triton'")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "must be a mapping of metadata (a dict)")
        try:  # saved in config.json: it must come back as it is
            same = json.loads(json.dumps(self.extra, sort_keys=True)) == self.extra
        except (TypeError, ValueError):
            same = False
        if not same:
            _fail("extra", self.extra, "must hold JSON data (string keys; strings, numbers, booleans, None, lists "
                  "and dicts), which config.json stores as it is")

    def _integer(self, name: str, minimum: int, note: str = "", *, optional: bool = False,
                 maximum: int | None = None) -> None:
        """The field is an int (not a bool) in [minimum, maximum], or None when `optional`; a numpy or 0-d tensor
        integer becomes an int."""
        value = as_integer(getattr(self, name))
        setattr(self, name, value)
        if optional and value is None:
            return
        if not (is_integer(value) and within(value, minimum, maximum)):
            allowed = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            _fail(name, value, f"must be an integer {allowed}" + (" or None" if optional else "") +
                  (f" ({note})" if note else ""))

    def _number(self, name: str, minimum: float, *, strict: bool, maximum: float | None = None,
                note: str = "") -> None:
        """The field is a finite int or float above `minimum` (`strict`) or at least it, at most `maximum`; a numpy
        or 0-d tensor number becomes a float."""
        value = as_number(getattr(self, name))
        setattr(self, name, value)
        if not (is_number(value) and within(value, minimum, maximum, above=strict)):
            low = f"> {minimum:g}" if strict else f">= {minimum:g}"
            _fail(name, value, f"must be a finite number {low}" + (f" and <= {maximum:g}" if maximum is not None
                                                                       else "") + (f" ({note})" if note else ""))

    def _validate_pattern(self, name: str, pattern: str | None, letters: dict[str, str]) -> None:
        if pattern is None:
            return
        L, n = self.layers_per_block, self.n_layers
        if not isinstance(pattern, str) or len(pattern) not in (L, n):
            _fail(name, pattern, f"must be a string of length layers_per_block={L} or n_layers={n}")
        bad = sorted(set(pattern) - set(letters))
        if bad:
            _fail(name, pattern, f"has unknown letters {bad}; allowed: " +
                  ", ".join(f"{k!r} ({v})" for k, v in letters.items()))

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_layers(self) -> int:
        return self.n_blocks * self.layers_per_block

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def expert_hidden_size(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else self.mlp_hidden

    @property
    def conba_inner(self) -> int:
        return self.conba_expand * self.d_model

    @property
    def conba_heads(self) -> int:  # H
        return self.conba_inner // self.conba_head_dim

    # ------------------------------------------------------------------ layout
    def layout(self) -> list[tuple[str, str]]:
        """One (mixer, ffn) pair per layer; mixer in {"attention", "conba"}, ffn in {"mlp", "moe"}."""
        L, a, e = self.layers_per_block, self.attn_per_block, self.moe_every
        out = []
        for layer in range(self.n_layers):
            i = layer % L
            if self.layer_pattern is not None:
                mixer = MIXER_LETTERS[self.layer_pattern[layer % len(self.layer_pattern)]]
            elif a == 0:
                mixer = "conba"
            else:
                period = L // a
                mixer = "attention" if i % period == period // 2 else "conba"
            if self.moe_pattern is not None:
                ffn = FFN_LETTERS[self.moe_pattern[layer % len(self.moe_pattern)]]
            else:
                ffn = "moe" if e > 0 and i % e == e - 1 else "mlp"
            out.append((mixer, ffn))
        return out

    def layout_string(self) -> str:
        """Per block, mixer letters over ffn letters, blocks joined by ' | ', e.g. 'CCACCCAC/DMDMDMDM | ...'."""
        letters = ["".join("A" if m == "attention" else "C" for m, _ in self.layout()),
                   "".join("M" if f == "moe" else "D" for _, f in self.layout())]
        L = self.layers_per_block
        blocks = [f"{letters[0][i:i + L]}/{letters[1][i:i + L]}" for i in range(0, self.n_layers, L)]
        return " | ".join(blocks)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names `from_dict`, `replace` and --set take."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixConConfig:
        if not isinstance(data, dict):
            raise ValueError(f"MixConConfig: expected a mapping of field names to values, got {type(data).__name__}")
        known = cls.field_names()
        unknown = sorted(set(data) - known, key=repr)
        if unknown:
            raise ValueError(f"MixConConfig: unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MixConConfig:
        """The config `to_json` wrote."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write `to_json()` to `path` whole or not at all (a file `load` and `mixcon train --config` read)."""
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> MixConConfig:
        """The config a JSON file holds; a file that is not one is refused by name."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a config JSON file ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a config JSON file (a {type(data).__name__}, not an object of fields)")
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> MixConConfig:
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **overrides})

    @staticmethod
    def placement(attn_per_block: int) -> dict[str, Any]:
        """The fields that give `attn_per_block` (a) attention layers per block at the default placement:
        a, and no `layer_pattern` or `conba_per_block` (which would have to agree with a)."""
        return {"attn_per_block": attn_per_block, "layer_pattern": None, "conba_per_block": None}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MixConConfig:
        """A named size ("mixcon-paper", "small", "tiny") with any field overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model: 4 blocks x 8 layers, a:c = 2:6, MoE every 2nd layer, 16 experts top-2.
    "mixcon-paper": dict(
        d_model=4096, vocab_size=256000, n_blocks=4, layers_per_block=8, attn_per_block=2, moe_every=2,
        n_experts=16, top_k=2, n_heads=32, n_kv_heads=8, head_dim=128, mlp_hidden=14336,
        conba_expand=2, conba_head_dim=64, conba_state=128, conba_groups=8, conba_delay=2,
        conba_sel_hidden=256, tie_embeddings=False,
    ),
    # Trains on a CPU in minutes. Chunks of 32 steps: at its shapes the faster on CPUs, eager and compiled
    # (docs/benchmarks.md §8).
    "small": dict(
        d_model=256, vocab_size=8192, n_blocks=2, layers_per_block=8, attn_per_block=2, moe_every=2,
        n_experts=8, top_k=2, n_heads=4, n_kv_heads=2, mlp_hidden=640, conba_expand=2, conba_head_dim=64,
        conba_state=64, conba_groups=1, conba_delay=2, conba_chunk=32, conba_sel_hidden=32,
    ),
    # For tests: every kind of layer in ~190K parameters.
    "tiny": dict(
        d_model=32, vocab_size=300, n_blocks=2, layers_per_block=4, attn_per_block=1, moe_every=2,
        n_experts=4, top_k=2, n_heads=4, n_kv_heads=2, mlp_hidden=64, conba_expand=2, conba_head_dim=16,
        conba_state=8, conba_groups=2, conba_delay=2, conba_chunk=8, conba_sel_hidden=8,
    ),
}
