"""The no-network baseline for fluorescent nuclei: Otsu's threshold and a
watershed on the distance transform, seeded at its local maxima."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed


def otsu_watershed(image: np.ndarray, min_distance: int, sigma: float = 1.0, min_size: int = 20) -> np.ndarray:
    """Instance labels (0 = background) of one 2D image: foreground above
    Otsu's threshold of the smoothed image, without specks smaller than
    `min_size`, split by a watershed of the negated distance transform from
    seeds at least `min_distance` pixels apart."""
    smooth = ndimage.gaussian_filter(image.astype(np.float64), sigma)
    foreground = smooth > threshold_otsu(smooth)
    components, n = ndimage.label(foreground)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    foreground &= (sizes >= min_size)[components]
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndimage.label(foreground)[0], exclude_border=False)
    markers = np.zeros(image.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground).astype(np.uint64)
