"""Serving stage: loads an artifact directory and answers HTTP.

Never imports torch (a lean runtime image carries numpy, Pillow and onnxruntime/tensorrt
only); ``tests/test_serving_no_torch.py`` guards this.
"""
