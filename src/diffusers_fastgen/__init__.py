"""diffusers_fastgen: diffusion step distillation shipped as diffusers pipelines and schedulers."""

__version__ = "0.1.0"

from .pipelines import DigitsPipeline  # noqa: F401  (diffusers resolves components by these names)
from .schedulers import FlowMatchFewStepScheduler  # noqa: F401
