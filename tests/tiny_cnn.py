"""The smallest model the training tests use: Conv -> BatchNorm -> ReLU -> Dense (Flax layers).

Also loadable by the launcher: ``--config.model.name=tiny_cnn:make`` with ``tests/`` on the path.
"""

import flax.linen as nn


class TinyCNN(nn.Module):
  num_classes: int = 10
  features: int = 8
  use_norm: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.features, (3, 3))(x)
    if self.use_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


def make(num_classes, **unused):
  """The launcher's model factory signature: ``make(num_classes, **model_config)``."""
  del unused
  return TinyCNN(num_classes)
