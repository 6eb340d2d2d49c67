from .pipeline_digits import DigitsPipeline
