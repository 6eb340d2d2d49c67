from .denoising import denoising_loss
from .regression import kd_loss
