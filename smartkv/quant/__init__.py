"""Quantization primitives (pure tensor math) and, on CUDA, fused kernels."""
from smartkv.quant.core import BITS, QTensor, cat, check_bits, dequantize, pack, packed_width, quantize, unpack

__all__ = ["BITS", "QTensor", "cat", "check_bits", "dequantize", "pack", "packed_width", "quantize", "unpack"]
