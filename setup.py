"""onex-export: 1.x-Distill SD3/SD3.5 models from training to TensorRT engines.

Versions are pinned so that a fresh machine gets what the tests ran with; `constraints.txt` pins the
transitive dependencies too. torch 2.13.0 is a CPU build on our CI machines and a CUDA build from PyPI.
"""
from setuptools import find_packages, setup

RTX = ["tensorrt-rtx-cu13-bindings==1.7.1.116", "tensorrt-rtx-cu13-libs==1.7.1.116"]

setup(
    name="onex-export",
    version="0.1.0",
    description="Export 1.x-Distill SD3/SD3.5 models (two-step, cache-skipping) to ONNX and TensorRT",
    python_requires=">=3.10",
    packages=find_packages(include=["onex_export", "onex_export.*"]),
    install_requires=[
        "torch==2.13.0",
        "diffusers==0.42.1",
        "safetensors==0.8.0",
        "click==8.5.1",
        "tqdm==4.70.1",
        "numpy==2.4.6",
        "onnx==1.23.2",
        "onnxruntime==1.31.1",
        "transformers==5.23.0",  # the CLIP and T5 text encoders
        "pillow==13.0.0",
    ],
    extras_require={
        # TensorRT-RTX: installs anywhere and builds engines ahead of time on a CPU (RTX GPUs, SM 7.5-12.x).
        "tensorrt-rtx": RTX,
        # Full TensorRT for data-centre GPUs; its libs package downloads from NVIDIA at install time.
        "tensorrt": ["tensorrt-cu13-bindings==11.4.0.106", "tensorrt-cu13-libs==11.4.0.106"],
        "bench": ["matplotlib==3.11.2", "cache-dit==1.5.3"],  # cache-dit: a training-free peer
        "train": ["PyYAML==6.0.3"],
        "test": ["pytest==9.2.0", "matplotlib==3.11.2", "cache-dit==1.5.3", "PyYAML==6.0.3", *RTX],
    },
    entry_points={"console_scripts": ["onex-export=onex_export.cli:main"]},
)
