"""Adapters to DeePMD-kit's TensorFlow backend.

``schema`` (no TensorFlow) registers the RLEKF optimizer keys; ``plugin``
routes ``dp train`` to ``trainer.RLEKFTrainer`` when the optimizer is RLEKF.
Nothing here is imported by ``import alkpu_plugin`` itself.
"""
