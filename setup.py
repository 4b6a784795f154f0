"""Install candle_ckpt: `pip install .` (`-e` to develop; `.[test]` adds what the tests run:
pytest, ruff, mypy, matplotlib and the docs site's builder; `.[torch]` the PyTorch adapter's
torch and torchdata; `.[plot]` matplotlib, for `candle-ckpt plot --out`; `.[docs]` mkdocs,
for the site)."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "(.+)"$', (HERE / "candle_ckpt" / "__init__.py").read_text(), re.M
).group(1)

PLOT = ["matplotlib>=3.5"]
# pinned: a new release's strict mode may judge the same pages differently
DOCS = ["mkdocs==1.6.1", "mkdocs-material==9.8.2"]

setup(
    name="candle_ckpt",
    version=VERSION,
    description="Crash-consistent checkpoint/restart of Keras and PyTorch training jobs on "
    "HPC clusters (ECP-CANDLE style)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level schemas/ is the canonical copy; candle_ckpt/schemas links to it, so
    # it is installed as the package candle_ckpt.schemas and installed code never
    # reads the source tree.
    packages=[
        "candle_ckpt",
        "candle_ckpt.core",
        "candle_ckpt.core.format",
        "candle_ckpt.core.restore",
        "candle_ckpt.core.run",
        "candle_ckpt.core.save",
        "candle_ckpt.core.storage",
        "candle_ckpt.keras",
        "candle_ckpt.pytorch",
        "candle_ckpt.operator",
        "candle_ckpt.schemas",
    ],
    package_data={"candle_ckpt.schemas": ["*.json"]},
    install_requires=[
        "tensorflow>=2.16",  # Keras 3
        "keras>=3.0",
        "h5py>=3.8",
        "jsonschema>=4.18",
        "isal>=1.0",  # CRC32 about 3x faster than zlib; zlib is the fallback
        "numpy",
    ],
    # ruff and mypy are pinned: CI fails on their findings, which change between releases.
    # torch is pinned: on these machines `torch==2.13.0` resolves to the CPU build already
    # on disk, while a bare `torch` or an open range downloads a multi-GB CUDA build.
    # torchdata is pinned: candle_ckpt/pytorch/loader.py restores a StatefulDataLoader
    # through the iterator torchdata 0.11.0 makes, and its state_dict's layout.
    extras_require={
        # the tests build the docs site and draw a plot: a test skipped for a missing
        # package would be a hole
        "test": ["pytest>=7", "ruff==0.17.6", "mypy==2.4.1", *PLOT, *DOCS],
        "torch": ["torch==2.13.0", "torchdata==0.11.0"],
        "plot": PLOT,
        "docs": DOCS,
    },
    entry_points={"console_scripts": ["candle-ckpt = candle_ckpt.operator.cli:main"]},
)
