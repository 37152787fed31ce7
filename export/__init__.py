"""Export the bundle's UNet (LCM LoRA already fused) to ONNX and TensorRT, and check it.

    python -m export {onnx,verify,tensorrt,all,bench} --help

onnx_export     torch -> ONNX (dynamo exporter; dynamic batch, latent sides 4k; graph cleanup; metadata)
verify          ONNX Runtime vs torch on the same inputs, with stated tolerances
tensorrt_build  strongly typed TensorRT plans, profiles from the Serve config, timing cache, PlanInfo
manifest        records exports in the bundle manifest (files with sha256, provenance["exports"])
sdxl_config     the full-size SDXL-inpainting UNet / VAE configs and their FLOP counts
cli, progress   the command line and its stage printer
The runners that serve these files live in engines/runners.py.
"""
