"""alkpu-plugin: single-model active learning for DeePMD potentials.

* ``alkpu_plugin.kalman``: the Kalman core (no DeePMD, no TensorFlow).
* ``alkpu_plugin.deepmd_tf``: the RLEKF optimizer for ``dp train`` (TensorFlow backend).
"""

__version__ = "0.1.0"
