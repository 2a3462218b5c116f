"""jaxnorm experiment launchers: `python -m experiments.reproduce`, `experiments/train.py`."""
