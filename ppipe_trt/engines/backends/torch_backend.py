"""PyTorch backend: runs a ``torch.nn.Module`` or a TorchScript file for a block range.

Small on purpose: it exists to check CUDA paths on a GPU against an independent executor.
The module's ``forward`` takes the inputs positionally in ``inputs`` order and returns a
tensor or a tuple in ``outputs`` order.  torch is imported on ``load()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ppipe_trt.engines.backends.base import Backend, TensorSpec
from ppipe_trt.errors import BackendUnavailableError, BadInputError


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(f"PyTorch is not installed: {exc}; pip install torch") from None
    return torch


class TorchBackend(Backend):
    """Runs ``module`` (an ``nn.Module`` or a path to a TorchScript file) on ``device``.
    Returned arrays are fresh copies owned by the caller."""

    name = "torch"

    def __init__(self, module: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 device: str = "cpu"):
        super().__init__()
        self._module_src = module
        self._inputs, self._outputs = tuple(inputs), tuple(outputs)
        self.device = device
        self._module = None

    @classmethod
    def for_builtin(cls, model_name: str, device: str = "cpu") -> "TorchBackend":
        """The whole built-in demo model ``model_name`` (same seeded weights as its ONNX)."""
        from ppipe_trt.models import model_info

        info = model_info(model_name)
        ins = (TensorSpec(info.input_name, info.dtype, (-1,) + info.input_shape),)
        outs = tuple(TensorSpec(n, info.dtype, (-1,)) for n in info.output_names)
        return cls(model_name, ins, outs, device)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def _load_impl(self) -> None:
        torch = import_torch()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"PyTorch {torch.__version__} has no CUDA device for "
                                          f"device {self.device!r}")
        src = self._module_src
        if isinstance(src, (str, Path)) and Path(src).suffix in (".pt", ".ts", ".torchscript"):
            module = torch.jit.load(str(src), map_location=self.device)
        elif isinstance(src, str):
            from ppipe_trt.models.demo_nets import build_demo_module

            module = build_demo_module(src)
        elif isinstance(src, torch.nn.Module):
            module = src
        else:
            raise BadInputError(f"torch backend: {src!r} is neither an nn.Module, a TorchScript "
                                "file nor a built-in model name")
        self._torch = torch
        self._module = module.to(self.device).eval()

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name], dtype=s.dtype)).to(self.device)
                for s in self._inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(self._outputs):
            raise BadInputError(f"torch module returned {len(result)} outputs; expected "
                                f"{len(self._outputs)} ({[s.name for s in self._outputs]})")
        return {s.name: t.detach().cpu().numpy().copy() for s, t in zip(self._outputs, result)}

    def _close_impl(self) -> None:
        self._module = None
