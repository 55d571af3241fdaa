"""Pure functions on adapters as values, `(config, meta, tensors)`: no model needed.

* `combine`: merge several adapters of one method into one (task arithmetic, cat, SVD, TIES, DARE,
  DAREx-q, magnitude pruning), the modes of peft's `add_weighted_adapter` and more (combine.py);
* the elementwise operators they are made of: DARE / DAREx-q random pruning, magnitude pruning,
  TIES sign election and disjoint mean, the data-free DAREx-q scale (prune.py);
* `compress`: ComPEFT, top-k + ternary + one scalar per tensor, stored compactly (compeft.py).
"""

from .combine import MODES, CombineError, combine, tune_q
from .compeft import compeft, compress, compression_ratio
from .prune import dare, data_free_scale, disjoint_mean, magnitude_prune, majority_sign_mask

__all__ = ["MODES", "CombineError", "combine", "compeft", "compress", "compression_ratio", "dare", "data_free_scale", "disjoint_mean", "magnitude_prune",
           "majority_sign_mask", "tune_q"]
