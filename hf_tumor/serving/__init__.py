"""The serving path: a model folder in, answers out (``hf-tumor predict``, the Space, the checks).

Reading files and scans (``image_io``, ``dicom``, ``dicom_series``, ``volumes``, ``scan``), the model's
preprocessing (``preprocessing``), the backends (``inference``; ``model`` loads the PyTorch one), the
domain checks (``domain``, ``neighbours``), heatmaps (``explain``) and the app's tables (``reporting``).
It imports nothing from ``hf_tumor.training`` or ``hf_tumor.checks``: a Space is this folder, with
``hf_tumor/__init__.py``, ``errors.py`` and ``contract.py``.
"""
