__all__ = ["scaled_dot_product_attention", "softmax"]

import numpy as np
from numpy.typing import ArrayLike, NDArray

# the same signature as pyattn.scaled_dot_product_attention
from .functional import scaled_dot_product_attention as scaled_dot_product_attention

def softmax(scores: ArrayLike, axis: int = ..., sink: ArrayLike | None = ...
            ) -> NDArray[np.floating]: ...
