"""Bridges to other tools; each module imports its tool, so import the one you need, e.g.
`from mixcon.integrations.lm_eval import MixConLM` (needs `lm-eval`)."""
