"""Pure-JAX normalization math: no Flax import, usable from Haiku, Equinox or plain JAX.

One file per idea; each file's docstring names the paper and equations it implements.
"""
