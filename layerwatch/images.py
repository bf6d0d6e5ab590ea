"""Small numpy renderers for the pictures layerwatch puts in TensorBoard (no matplotlib needed).

Images are ``[H, W, 3]`` uint8 arrays. They carry no text: the TensorBoard tag says what they show, and the
layout is fixed (layers on the vertical axis with layer 0 at the bottom, steps or layers left to right).
"""

from __future__ import annotations

import numpy as np

# Anchor colours of matplotlib's "viridis", linearly interpolated: dark purple = low, yellow = high.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_NAN_COLOUR = np.array([200, 200, 200], dtype=np.uint8)


def colourize(values: np.ndarray) -> np.ndarray:
    """Map an array to viridis colours, scaled to its own finite min..max; NaN becomes grey."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.empty(values.shape + (3,), dtype=np.uint8)
    out[...] = _NAN_COLOUR
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low)
        position = np.clip(scaled, 0, 1) * (len(_VIRIDIS) - 1)
        index = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
        weight = (position - index)[..., None]
        rgb = _VIRIDIS[index] * (1 - weight) + _VIRIDIS[index + 1] * weight
        out[finite] = np.round(rgb[finite]).astype(np.uint8)
    return out


def heatmap(matrix: np.ndarray, *, cell_height: int = 12, max_width: int = 640) -> np.ndarray:
    """A ``[layers, steps]`` matrix as an image: one row per layer (layer 0 at the bottom), one column per step."""
    matrix = np.asarray(matrix, dtype=np.float64)
    layers, steps = matrix.shape
    cell_width = max(1, min(24, max_width // max(steps, 1)))
    image = colourize(matrix[::-1])  # flip so layer 0 is the bottom row
    return np.repeat(np.repeat(image, cell_height, axis=0), cell_width, axis=1)


def depth_profile(values: np.ndarray, *, height: int = 120, bar_width: int = 16) -> np.ndarray:
    """Per-layer values as bars, layer 0 on the left; bar height spans the finite min..max (min gets a sliver)."""
    values = np.asarray(values, dtype=np.float64)
    image = np.full((height, bar_width * len(values), 3), 255, dtype=np.uint8)
    finite = np.isfinite(values)
    if not finite.any():
        return image
    low, high = values[finite].min(), values[finite].max()
    colours = colourize(values)
    for layer, value in enumerate(values):
        x0, x1 = layer * bar_width + 1, (layer + 1) * bar_width - 1
        if not np.isfinite(value):
            image[:, x0:x1] = _NAN_COLOUR
            continue
        fraction = 1.0 if high <= low else 0.1 + 0.9 * (value - low) / (high - low)
        top = height - int(round(fraction * height))
        image[top:, x0:x1] = colours[layer]
    return image
