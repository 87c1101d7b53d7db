"""ppipe-trt: pipelined CNN inference on heterogeneous GPU clusters.

Importing this package (or any module outside ``ppipe_trt.engines.backends.tensorrt_backend``,
``..cuda``, ``..torch_backend``) never imports tensorrt, cuda-python or torch, so the planner,
simulator, API and tests run on machines without a GPU.
"""

__version__ = "0.1.0"
