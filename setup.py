"""Installs the detr_d2 package (``pip install -e .``); d2/install.sh sets up its dependencies."""

from setuptools import find_packages, setup

setup(
    name="detr_d2",
    version="0.1.0",
    description="DETR (DEtection TRansformer) as a Detectron2 plugin",
    packages=find_packages(include=["detr_d2", "detr_d2.*"]),
    python_requires=">=3.9",
    # Detectron2 itself is not on PyPI under its name: see d2/install.sh.
    install_requires=["torch", "torchvision", "scipy", "pycocotools", "fvcore", "iopath"],
)
