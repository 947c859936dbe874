"""Front ends: networks and properties from the formats the field exchanges (ONNX, VNN-LIB)."""
