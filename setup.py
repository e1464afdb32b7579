"""onex-export: 1.x-Distill SD3/SD3.5 models from training to TensorRT engines.

Requirements are compatible ranges, from the version the tests ran with up to the next major version, so
that a service embedding the runtime keeps its own torch; `constraints.txt` pins every version (transitive
ones too) and the README's commands install with it, so a fresh machine gets exactly what the tests ran
with. torch 2.14.1 with torchvision 0.29.1 (which the quality metrics need) is a CUDA build; it runs on a CPU.
"""
from setuptools import find_packages, setup

# an engine runs only on the TensorRT version that built it: the flavours stay within one minor version
SERVE = ["nvidia-pytriton>=0.7,<0.8", "tritonclient[http,grpc]>=2.73,<3"]
# bench.quality: FID (torchmetrics over torch-fidelity's Inception), LPIPS, CLIP-based scores, HPSv2 (open_clip)
QUALITY = ["torchmetrics>=1.9,<2", "torch-fidelity>=0.4,<0.5", "lpips>=0.1.4,<0.2", "open-clip-torch>=3.3,<4",
           "torchvision>=0.29,<1", "scipy>=1.17,<2"]
# the toy world (bench.toy, train/toy): scikit-learn's bundled handwritten digits
TOY = ["scikit-learn>=1.9,<2"]
RTX = ["tensorrt-rtx-cu13-bindings>=1.7.1,<1.8", "tensorrt-rtx-cu13-libs>=1.7.1,<1.8"]
CPP = ["nlohmann-json>=3.12,<4"]  # header-only JSON for the C++ runner (PyPI repackaging of nlohmann/json)

setup(
    name="onex-export",
    version="0.1.0",
    description="Export 1.x-Distill SD3/SD3.5 models (two-step, cache-skipping) to ONNX and TensorRT",
    python_requires=">=3.10",
    packages=find_packages(include=["onex_export", "onex_export.*"]),
    package_data={"onex_export": ["schemas/*.json", "models/embedded/*/*", "models/embedded/*/*/*"]},
    install_requires=[
        "torch>=2.13,<3",
        "diffusers>=0.42,<1",
        "safetensors>=0.8,<1",
        "click>=8.5,<9",
        "tqdm>=4.70,<5",
        "numpy>=1.26,<3",  # 1.26 while PyTriton (the serve extra) needs numpy<2
        "onnx>=1.23,<2",
        "onnxruntime>=1.31,<2",
        "transformers>=5.23,<6",  # the CLIP and T5 text encoders
        "pillow>=13,<14",
    ],
    extras_require={
        # TensorRT-RTX: installs anywhere and builds engines ahead of time on a CPU (RTX GPUs, SM 7.5-12.x).
        "tensorrt-rtx": RTX,
        # Full TensorRT for data-centre GPUs; its libs package downloads from NVIDIA at install time.
        "tensorrt": ["tensorrt-cu13-bindings>=11.4,<11.5", "tensorrt-cu13-libs>=11.4,<11.5"],
        "bench": ["matplotlib>=3.11,<4", "cache-dit>=1.5.3,<2", *QUALITY, *TOY],  # cache-dit: a training-free peer
        # Stage II: LoRA through peft, the discriminator's OpenCLIP ConvNeXt tower through open-clip-torch
        "train": ["PyYAML>=6,<7", "peft>=0.21.2,<1", "open-clip-torch>=3.3,<4", *TOY],
        # `onex-export serve`: PyTriton carries a real Triton Inference Server; tritonclient talks to it
        "serve": SERVE,
        # cpp/onex_runner.cpp (the C++ runner of --aoti builds) reads manifest.json with nlohmann/json's header
        "cpp": CPP,
        # jsonschema: the tests validate real manifests against onex_export/schemas/manifest.schema.json
        "test": ["pytest>=9.2,<10", "matplotlib>=3.11,<4", "cache-dit>=1.5.3,<2", "PyYAML>=6,<7", "peft>=0.21.2,<1",
                 "jsonschema>=4.26,<5",
                 *RTX, *SERVE, *QUALITY, *TOY, *CPP],
    },
    entry_points={"console_scripts": ["onex-export=onex_export.cli:main"]},
)
