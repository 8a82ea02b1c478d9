"""Inference: runners (PyTorch, ONNX Runtime, TensorRT), decode + NMS, COCO evaluation."""
