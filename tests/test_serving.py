"""The serving layer stands alone: predicting with the bundled int8 model loads no training stack, and the
Space asks for nothing that serving does not import."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, real_images

TRAINING_STACK = ("datasets", "pyarrow", "accelerate", "evaluate", "sklearn", "matplotlib")


def test_predicting_imports_no_training_stack():
    image = real_images("Testing", "glioma", 1)[0]
    code = (
        "import sys\n"
        "from hf_tumor import domain, explain, inference, reporting, scan\n"
        "predictor = inference.load_predictor(inference.BUNDLED_MODEL, 'onnx-int8')\n"
        f"print(predictor.predict_files([{str(image)!r}])[0].label)\n"
        f"print(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    label, loaded = result.stdout.strip().splitlines()
    assert label == "glioma" and loaded == "[]"


def test_space_requirements_are_pinned_and_hold_no_training_stack():
    lines = [line for line in (REPO / "space" / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    names = {line.split("==")[0].lower() for line in lines}
    assert all("==" in line for line in lines)
    assert not names & {"datasets", "accelerate", "evaluate", "scikit-learn", "matplotlib", "pyyaml"}
    assert {"torch", "timm", "transformers", "gradio", "onnxruntime", "pydicom", "nibabel"} <= names
    assert "grad-cam" not in names  # the heatmap is computed in torch (hf_tumor.explain)
