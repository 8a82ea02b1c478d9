"""Fake-quant INT8 with pytorch-quantization: quantizer insertion, calibration, amax sharing."""
