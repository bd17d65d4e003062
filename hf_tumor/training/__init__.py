"""The training path: data, the recipe (``train``), evaluation, export and publishing.

The Kaggle folders and their audit (``data``, ``audit``, ``augment``, ``patient_slices``), the Trainer
recipe (``train``), evaluation and calibration (``evaluation``, ``calibration``, ``plots``), ONNX export
and its parity check (``export``), the Hub (``hub``, ``hub_dataset``), the browser page (``web``) and the
machine's description (``runtime``). It uses the serving path for every forward.
"""
