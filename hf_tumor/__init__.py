"""hf-tumor: brain-tumor MRI slice classification on the Hugging Face stack (timm + transformers + datasets)."""

__version__ = "0.1.0"
