"""ONNX towers: export a loaded model's text and image towers (torch side, `export.py`) and run them
with onnxruntime without importing torch, open_clip or transformers (`runtime.py`).

An export is a folder holding `text.onnx`, `image.onnx`, the tokenizer files and `export.json`,
which records the model identity (weights SHA-256) and everything the runtime needs. Searches use
an export automatically when one matching the index's model is found (see `choose.py`).
"""

EXPORT_JSON = "export.json"
TEXT_FILE = "text.onnx"
IMAGE_FILE = "image.onnx"
FORMAT_VERSION = 1
