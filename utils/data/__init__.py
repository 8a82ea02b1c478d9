"""Data: COCO-format datasets, letterbox pre-processing, calibration image sets, the synthetic generator."""
