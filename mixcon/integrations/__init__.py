"""Bridges to other tools; each module imports its tool, so import the one you need, e.g.
`from mixcon.integrations.lm_eval import MixConLM` (needs `lm-eval`) or
`from mixcon.integrations.transformers import MixConHFForCausalLM` (needs `transformers` >= 5)."""
