"""Unpickling restricted to numpy arrays, for the pickled data and weights that registry packages ship."""
from __future__ import annotations

import pickle

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers of numpy arrays and nothing else: any other global in the stream is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return self.ALLOWED[(module, name)]
