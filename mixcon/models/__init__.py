"""Model assembly."""

from mixcon.models.mixcon import MixConForCausalLM, MixConLayer, MixConOutput

__all__ = ["MixConForCausalLM", "MixConLayer", "MixConOutput"]
