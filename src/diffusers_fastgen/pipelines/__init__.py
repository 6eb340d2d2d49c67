from .digits import DigitsPipeline
