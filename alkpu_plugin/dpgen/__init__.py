"""DP-GEN with one RLEKF model and KPU: ``alkpu run`` and what it needs.

* :mod:`.params`: the keys this plugin adds to a DP-GEN ``param.json``
  (``"uncertainty"``, the ``"kpu"`` block), checked before DP-GEN's own schema;
* :mod:`.model_size`: the trainable weights of the param.json's model, so P's
  memory is checked before any job is submitted;
* :mod:`.driver`: DP-GEN's loop and step functions, with the training,
  exploration and selection steps of ALKPU when ``"uncertainty": "kpu"``;
* :mod:`.stages`: the progress line and the CPU and wall time of every step.
"""
