"""JPEG decoding with Pillow that gives TensorFlow's pixels, for machines without TensorFlow.

CIFAR-10 (JPEG-75) reaches lpa_jax through TFDS, whose ``tf.io.decode_image`` runs libjpeg
with the fast integer IDCT (``JDCT_IFAST``) and "fancy" (triangle-filter) chroma upsampling.
Pillow decodes with the accurate IDCT, so its pixels differ (most sub-pixels by 1-5 levels).
:func:`decode_jpegs` asks Pillow for libjpeg's draft decode instead — the same fast IDCT, the
chroma planes at their stored resolution (each sample repeated 2×2), no colour conversion —
and then applies libjpeg's ``h2v2_fancy_upsample`` and its fixed-point YCbCr→RGB conversion
(``jdsample.c``, ``jdcolor.c``) in numpy.  On the CIFAR-10 (JPEG-75) files this reproduces
TensorFlow's arrays bit for bit (checked with Pillow 13.0 and its libjpeg-turbo on all 22,406
images of the paper long-tail task; image by image whenever a portable file is written, and by
its SHA-256 whenever it is read, so another Pillow that decodes differently is caught there).

Only baseline 4:2:0 colour JPEGs (what the CIFAR-10 (JPEG-75) copy holds) are decoded; any
other kind raises :class:`ValueError`.

  >>> import io
  >>> from PIL import Image
  >>> f = io.BytesIO(); Image.new("RGB", (32, 32), (200, 30, 90)).save(f, "JPEG", quality=75)
  >>> x = decode_jpegs([f.getvalue()])          # the bytes of JPEG files
  >>> x.shape, x.dtype
  ((1, 32, 32, 3), dtype('uint8'))
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

_SCALE, _HALF = 16, 1 << 15


def _fix(x: float) -> int:
  return int(x * (1 << _SCALE) + 0.5)


def _ycc_box(blob: bytes) -> np.ndarray:
  """libjpeg's draft decode of one JPEG: Y, Cb, Cr at full size, chroma repeated 2×2."""
  from PIL import Image, JpegImagePlugin
  im = Image.open(io.BytesIO(blob))
  if im.format != "JPEG" or im.mode != "RGB" or JpegImagePlugin.get_sampling(im) != 2:
    raise ValueError(f"decode_jpegs handles baseline 4:2:0 colour JPEGs only, got format "
                     f"{im.format}, mode {im.mode}")
  im.draft("YCbCr", None)
  im.decoderconfig = (1, 1)  # (scale, draft): draft = fast IDCT, plain chroma upsampling
  im.load()
  if im.mode != "YCbCr":
    raise ValueError(f"Pillow {Image.__version__} did not decode to YCbCr (got {im.mode})")
  return np.asarray(im)


def fancy_upsample_h2v2(c_NxHxW: np.ndarray) -> np.ndarray:
  """libjpeg's ``h2v2_fancy_upsample``: each output sample is (9·nearest + 3·two others + 1·
  diagonal) / 16 with libjpeg's alternating rounding; image edges repeat the edge samples.

  >>> fancy_upsample_h2v2(np.full((1, 2, 2), 7, np.int32))[0]
  array([[7, 7, 7, 7],
         [7, 7, 7, 7],
         [7, 7, 7, 7],
         [7, 7, 7, 7]], dtype=int32)
  """
  c = np.asarray(c_NxHxW, np.int32)
  above = np.concatenate([c[:, :1], c[:, :-1]], 1)
  below = np.concatenate([c[:, 1:], c[:, -1:]], 1)
  n, h, w = c.shape
  out = np.empty((n, 2 * h, 2 * w), np.int32)
  for r, near in ((0, above), (1, below)):
    col = 3 * c + near  # the vertical triangle filter
    left = np.concatenate([col[:, :, :1], col[:, :, :-1]], 2)
    right = np.concatenate([col[:, :, 1:], col[:, :, -1:]], 2)
    even, odd = (3 * col + left + 8) >> 4, (3 * col + right + 7) >> 4
    even[:, :, 0] = (4 * col[:, :, 0] + 8) >> 4
    odd[:, :, -1] = (4 * col[:, :, -1] + 7) >> 4
    out[:, r::2, 0::2], out[:, r::2, 1::2] = even, odd
  return out


def ycc_to_rgb(y, cb, cr) -> np.ndarray:
  """libjpeg's ``ycc_rgb_convert`` (16-bit fixed point, JFIF coefficients), as uint8 RGB."""
  y, xb, xr = (np.asarray(a, np.int64) for a in (y, np.asarray(cb) - 128, np.asarray(cr) - 128))
  r = y + ((_fix(1.40200) * xr + _HALF) >> _SCALE)
  g = y + ((-_fix(0.34414) * xb + _HALF - _fix(0.71414) * xr) >> _SCALE)
  b = y + ((_fix(1.77200) * xb + _HALF) >> _SCALE)
  return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def decode_jpegs(blobs: Sequence[bytes]) -> np.ndarray:
  """``[N, H, W, 3]`` uint8 pixels of same-sized JPEGs, as ``tf.io.decode_image`` gives them
  (module docstring); vectorised after Pillow's per-image entropy decode."""
  if not len(blobs):
    raise ValueError("decode_jpegs got no images")
  ycc = np.stack([_ycc_box(b) for b in blobs]).astype(np.int32)
  cb, cr = (fancy_upsample_h2v2(ycc[:, ::2, ::2, k]) for k in (1, 2))
  return ycc_to_rgb(ycc[..., 0], cb, cr)
