from .denoiser import Denoiser
from .unwrap import unwrap_model
