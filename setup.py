"""megalong: MoE-centric GPT training on megatron-core with plug-in attention."""
from setuptools import find_packages, setup

setup(
    name="megalong",
    version="0.1.0",
    description="GPT pretraining on megatron-core with per-layer plug-in attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalong", "megalong.*"]),
    install_requires=[
        # Tested: 2.13.0 (CPU, CI) and 2.11 (H100). GPU users keep their own build in this range.
        "torch>=2.11,<2.14",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece>=0.2",
        "zstandard>=0.22",
        "transformers>=4.45",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
    ],
    extras_require={
        # tests run the DeepSpeed engine, lm-evaluation-harness (its `hf` model needs accelerate), W&B
        # offline and the plots
        "dev": ["pytest>=8", "triton==3.6.0", "deepspeed==0.19.8", "ruff==0.17.6", "mypy==2.4.1",
                "lm-eval==0.4.13", "accelerate==1.16.0", "wandb==0.31.0", "matplotlib==3.11.2"],
        "gpu": ["triton>=3.2"],
        "deepspeed": ["deepspeed==0.19.8"],
        "tensorboard": ["tensorboard"],
        "eval": ["lm-eval==0.4.13"],  # megalong eval --tasks, train.eval_tasks
        "wandb": ["wandb==0.31.0"],  # train.wandb
        "plot": ["matplotlib==3.11.2"],  # megalong plot
    },
    entry_points={"console_scripts": ["megalong=megalong.cli:main"]},
)
