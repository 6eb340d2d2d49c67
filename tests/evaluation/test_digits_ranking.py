"""The digits benchmark must rank known cases in the right order with margins larger than its noise: real
training digits above the teacher at 8 > 4 > 2 > 1 Euler steps, on FD, KID and recall, each a mean over two
sampling seeds of 300 samples, every consecutive gap larger than the two cases' seed spreads added."""

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference, benchmark_row, real_floor, seeded_scores
from diffusers_fastgen.pipelines import DigitsPipeline


def test_real_data_and_more_teacher_steps_rank_better_beyond_the_noise():
    reference = DigitsReference()
    pipe = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH)
    seeds, n = (0, 1), 300
    cases = [seeded_scores(lambda seed: real_floor(reference, n, seed), seeds)]
    for steps in (8, 4, 2, 1):
        cases.append(seeded_scores(lambda seed: benchmark_row(pipe, reference, name="teacher", num_inference_steps=steps,
                                                              guidance_scale=1.0, num_samples=n, seed=seed), seeds))
    for metric, better in (("fd", -1), ("kid", -1), ("recall", 1)):
        for a, b in zip(cases, cases[1:]):  # a should beat b
            (mean_a, std_a), (mean_b, std_b) = a[metric], b[metric]
            assert better * (mean_a - mean_b) > std_a + std_b, (metric, a[metric], b[metric])
