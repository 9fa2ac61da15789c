"""MixCon: a hybrid of attention, Conba (selective SSM with feedback control) and mixture-of-experts."""

from mixcon.config import MixConConfig
from mixcon.generation.cache import MixConCache, cache_nbytes
from mixcon.models.mixcon import MixConForCausalLM, MixConOutput

__version__ = "0.1.0"

__all__ = ["MixConCache", "MixConConfig", "MixConForCausalLM", "MixConOutput", "__version__", "cache_nbytes"]
