"""Benchmarks (`mixcon bench`): speed, scan, decode and matvec time mixcon and a baseline side by side in one
process; recall, filler and ablate train MixCon beside its twins or variants and score them; kernel reports the
Triton kernel's registers and spills."""
