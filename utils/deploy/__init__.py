"""Deployment: ONNX export and verification, ONNX graph edits, TensorRT engine layer reports."""
