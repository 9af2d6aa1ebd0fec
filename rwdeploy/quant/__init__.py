"""Weight quantization after pruning: fixed-point scales, quantization-aware retraining, QDQ ONNX."""
from rwdeploy.quant.fixed_point import dequantize, fake_quantize, power_of_two_scale, qrange, quantize
from rwdeploy.quant.program import save_quantized_program
from rwdeploy.quant.qat import QuantSpec, convert, prepare_qat, quantize_model
from rwdeploy.quant.size import model_size

__all__ = ["QuantSpec", "convert", "dequantize", "fake_quantize", "model_size", "power_of_two_scale",
           "prepare_qat", "qrange", "quantize", "quantize_model", "save_quantized_program"]
