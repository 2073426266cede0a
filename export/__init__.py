"""Export stage: checkpoint -> artifact directory (BN-folded FP32 ONNX, FP16 and INT8 ONNX,
optional TensorRT engines, labels.json, manifest.json). See docs/design.md."""
