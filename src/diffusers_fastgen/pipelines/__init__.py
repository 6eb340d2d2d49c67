from .digits import DigitsPipeline
from .causal_wan import CausalWanPipeline
