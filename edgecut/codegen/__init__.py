"""Code generation: TVM device and edge modules, ONNX copies, the artifact and its manifest."""
