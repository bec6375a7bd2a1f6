"""Install with `pip install -e .` (scripts/quickstart.sh and scripts/test.sh do it for you)."""
from setuptools import find_packages, setup

setup(
    name="pretrain",
    version="0.1.0",
    description="Self-supervised and generative pretraining of timm vision backbones on WebDataset shards",
    python_requires=">=3.9",
    packages=find_packages(include=["pretrain", "pretrain.*", "launch"]),
    package_data={"pretrain": ["configs/*.yaml"], "launch": ["*.sbatch"]},
    install_requires=[
        "torch>=2.3,<3",
        "torchvision>=0.18",
        "timm>=1.0,<2",
        "webdataset>=0.2.90,<2",
        "deepspeed>=0.15,<1",
        "tensorboard>=2.14,<3",
        "omegaconf>=2.3,<3",
        "safetensors>=0.4,<1",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=9",
        "scipy>=1.9",          # Frechet distance (matrix square root)
        "torch-fidelity==0.4.0",   # Inception-FID / IS (`pretrain eval gen --inception`): its InceptionV3 and metrics
    ],
    extras_require={
        "quickstart": ["scikit-learn>=1.2"],
        "bench": ["scikit-image>=0.21"],  # sample photos for scripts/bench.py data
        # baseline of scripts/bench.py multicrop (pulls pytorch_lightning; its transforms alone need only
        # `pip install --no-deps lightly lightning-utilities`); not in scripts/setup_env.sh's install
        "lightly": ["lightly>=1.5,<2"],
        "wandb": ["wandb>=0.31,<1"],   # log.wandb=true (Weights & Biases next to TensorBoard)
        # accelerate: launcher test; mpmath: float64+ references; wandb: tests/test_wandb.py (reads runs with `wandb leet inspect --json`, new in 0.31)
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "scikit-learn>=1.2", "accelerate>=1.0", "mpmath>=1.2",
                 "wandb>=0.31,<1"],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.cli:main"]},
)
