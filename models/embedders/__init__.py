"""Face-recognition embedders: iResNet (insightface-compatible weights); ONNX and the evaluator come later."""
