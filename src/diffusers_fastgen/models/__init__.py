from .denoiser import Denoiser, unwrap_model
