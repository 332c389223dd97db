"""Post-training quantization: specs, observers, calibration, weight quantization, emission."""
