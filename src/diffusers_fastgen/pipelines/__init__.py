from .causal_wan import CausalWanPipeline
from .digits import DigitsPipeline
