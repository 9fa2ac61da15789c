"""Modules: Conba, attention, MoE, SwiGLU MLP, norms, linear."""
