from setuptools import find_packages, setup

setup(
    name="diffusers_fastgen",
    version="0.1.0",
    description="Diffusion step distillation (DMD2, consistency models, MeanFlow, causal video) shipped as diffusers pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"diffusers_fastgen": ["evaluation/assets/**/*", "evaluation/assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the README/CI install command (CPU wheel); any >=2.5 works on GPU machines.
        "torch>=2.5",
        "diffusers>=0.42.1,<0.43",  # uses attention_backend and FlowMapEulerDiscreteScheduler
        "transformers>=4.50",
        "accelerate>=1.0",
        "peft>=0.15",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "tqdm",
        "numpy",
        "scipy",
        "scikit-learn",
        "pyyaml",
        "tensorboard",
        "torchmetrics>=1.4",  # FID / CLIP score of real models (evaluation.quality)
        "sentencepiece",
    ],
    entry_points={"console_scripts": ["diffusers-fastgen = diffusers_fastgen.cli:main"]},
    extras_require={"test": ["pytest>=8", "ruff>=0.6", "gradio>=5", "selenium>=4.20", "imageio>=2.30",
                             "imageio-ffmpeg>=0.5"],
                    "serve": ["gradio>=5"], "wandb": ["wandb"],
                    "video": ["imageio>=2.30", "imageio-ffmpeg>=0.5"]},  # MP4 in and out (diffusers' load/export_to_video)
)
