"""The Kalman core: block layout, EKFfm update, RLEKF measurement, KPU, state I/O.

Pure NumPy/SciPy: this package imports neither DeePMD-kit nor TensorFlow.
"""

from .ekffm import FilterOptions, KalmanFilter, KalmanNumericsWarning
from .layout import BlockLayout, LayoutMismatchError
from .state import KalmanStateError, load_state, read_meta, save_state

__all__ = [
    "BlockLayout",
    "FilterOptions",
    "KalmanFilter",
    "KalmanNumericsWarning",
    "KalmanStateError",
    "LayoutMismatchError",
    "load_state",
    "read_meta",
    "save_state",
]
