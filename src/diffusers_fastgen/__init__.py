"""diffusers_fastgen: diffusion step distillation shipped as diffusers pipelines and schedulers."""

__version__ = "0.1.0"

from .schedulers import FlowMatchFewStepScheduler  # noqa: F401  (diffusers loads it by this name)
