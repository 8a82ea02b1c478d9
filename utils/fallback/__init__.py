"""Float fallback: which layers stay float (rules over a sensitivity ranking) and the partial-quantization report."""
