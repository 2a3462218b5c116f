"""Image preprocessing and augmentation (numpy, on the host), per data set.

Train split only: CIFAR random 32x32 crop of the 4-pixel zero-padded image and a random horizontal
flip; ImageNet random-resized crop (scale [0.08, 1], aspect ratio [3/4, 4/3], bilinear) and flip,
centre crop of the image resized to ``size / 0.875`` for evaluation; MNIST and the embedded sets
are not augmented. Images are normalized per channel with the training set's mean and standard
deviation.

References:
  He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", arXiv:1512.03385
  (CIFAR augmentation); Szegedy et al. (2015), "Going Deeper with Convolutions",
  arXiv:1409.4842 (random-resized crop, as in the torchvision and big_vision ImageNet pipelines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def normalizer(mean: Sequence[float], std: Sequence[float], scale: float):
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def normalize(x: np.ndarray) -> np.ndarray:
    # x_hat = (x / scale - mean) / std, per channel.
    return ((x.astype(np.float32) / scale - mean) / std).astype(np.float32)

  return normalize


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: random HxW crop of the zero-padded image, then a random horizontal flip.

  Args:
    images: (B, H, W, C) array.
    rng: numpy generator (the only source of randomness).
    pad: zero padding on each side, in pixels.

  Returns:
    (B, H, W, C) array of the same dtype.

  References:
    He et al. 2016, "Deep Residual Learning", Sec. 4.2 (4-pixel padding, 32x32 crop, flip).
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, size=b)
  dx = rng.integers(0, 2 * pad + 1, size=b)
  flip = rng.random(b) < 0.5
  out = np.empty_like(images)
  for i in range(b):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image  # Pillow ships with matplotlib, a jaxnorm dependency.

  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def random_resized_crop(
    image: np.ndarray, rng: np.random.Generator, size: int,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """ImageNet training crop: a random area fraction and aspect ratio, resized to size x size.

  Args:
    image: (H, W, C) uint8 image of any size.
    rng: numpy generator.
    size: output side length.
    scale: range of the crop's area as a fraction of the image area.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.

  Returns:
    (size, size, C) uint8 image.

  References:
    Szegedy et al. 2015, "Going deeper with convolutions" (the "Inception crop"); ten attempts,
    then a centre crop, as in torchvision's ``RandomResizedCrop``.
  """
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      return _resize(image[y:y + ch, x:x + cw], size, size)
  return center_crop(image, size, crop_fraction=1.0)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet evaluation crop: the central ``crop_fraction`` square, resized to size x size.

  Equivalent to resizing the shorter side to ``size / crop_fraction`` and taking the centre
  ``size x size``.

  Args:
    image: (H, W, C) uint8 image.
    size: output side length.
    crop_fraction: side of the central square as a fraction of the shorter side.

  Returns:
    (size, size, C) uint8 image.

  References:
    Krizhevsky et al. 2012; the 0.875 (224 / 256) convention of the ResNet evaluation protocol.
  """
  h, w = image.shape[:2]
  side = max(1, int(round(min(h, w) * crop_fraction)))
  y, x = (h - side) // 2, (w - side) // 2
  return _resize(image[y:y + side, x:x + side], size, size)


def preprocess_fn(name: str, normalize, image_size: int | None):
  if name in ('cifar10', 'cifar100'):
    def preprocess(images, rng, train):
      x = np.stack(images)
      if train:
        x = random_crop_flip(x, rng, pad=4)
      return normalize(x)
  elif name == 'imagenet2012':
    def preprocess(images, rng, train):
      if train:
        x = [random_resized_crop(im, rng, image_size) for im in images]
        flip = rng.random(len(x)) < 0.5
        x = [im[:, ::-1] if f else im for im, f in zip(x, flip, strict=True)]
      else:
        x = [center_crop(im, image_size) for im in images]
      return normalize(np.stack(x))
  else:
    def preprocess(images, rng, train):
      del rng, train
      return normalize(np.stack(images))
  return preprocess


