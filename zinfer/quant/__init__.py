"""Group-wise int4 / int8 weight quantization: format (spec, pack), kernels (ops, triton_kernels)."""

from zinfer.quant.ops import quant_matmul
from zinfer.quant.pack import QuantizedWeight, dequantize, quantize
from zinfer.quant.spec import QuantSpec

__all__ = ["QuantSpec", "QuantizedWeight", "quantize", "dequantize", "quant_matmul"]
