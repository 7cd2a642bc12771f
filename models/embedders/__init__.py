"""Face-recognition embedders: iResNet (insightface-compatible weights) and ONNX (forward-only models)."""
