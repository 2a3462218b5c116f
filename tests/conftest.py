"""Test-wide set-up: 8 simulated CPU devices for the multi-device tests, and no network."""

import os

# Must be set before JAX initialises its backends. Single-device code runs on device 0 as usual.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Never let a test reach a real TFDS download (it retries for minutes before failing offline).
os.environ.setdefault('TFDS_DATA_DIR', os.path.join(os.path.dirname(__file__), '.tfds_none'))
os.environ.setdefault('MPLBACKEND', 'Agg')
