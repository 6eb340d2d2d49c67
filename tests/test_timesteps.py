import math

import pytest
import torch
from scipy import stats

from diffusers_fastgen import timesteps as ts

N = 20000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_ks():
    t = ts.sample_uniform((N,), t_min=0.2, t_max=0.7, generator=_gen())
    assert stats.kstest(t.numpy(), stats.uniform(loc=0.2, scale=0.5).cdf).pvalue > 0.01


def test_logit_normal_ks():
    t = ts.sample_logit_normal((N,), mean=0.3, std=0.8, generator=_gen())
    logits = torch.logit(t.double()).numpy()
    assert stats.kstest(logits, stats.norm(loc=0.3, scale=0.8).cdf).pvalue > 0.01


def test_log_normal_ks():
    s = ts.sample_log_normal((N,), mean=-1.2, std=1.2, generator=_gen())
    assert stats.kstest(s.double().log().numpy(), stats.norm(loc=-1.2, scale=1.2).cdf).pvalue > 0.01


def test_shifted_matches_pushforward():
    shift = 3.0
    t = ts.sample_shifted((N,), shift=shift, generator=_gen())
    # Inverse of t' = s t / (1 + (s-1) t) is t = t' / (s - (s-1) t'); the pre-image is uniform.
    pre = t.double() / (shift - (shift - 1) * t.double())
    assert stats.kstest(pre.numpy(), stats.uniform().cdf).pvalue > 0.01
    assert ts.shift_time(torch.tensor(0.5), 5.0).item() == pytest.approx(5 / 6)


def test_from_list_excludes_clean_end():
    t = ts.sample_from_list((N,), [0.999, 0.833, 0.0], generator=_gen())
    values, counts = torch.unique(t, return_counts=True)
    torch.testing.assert_close(values, torch.tensor([0.833, 0.999]))
    assert abs(counts[0].item() / N - 0.5) < 0.02


def test_meanflow_pairs():
    t, r = ts.sample_t_r_meanflow((N,), ratio_r_neq_t=0.25, mean=-0.4, std=1.0, generator=_gen())
    assert bool((r <= t).all())
    frac = (r != t).double().mean().item()
    assert abs(frac - 0.25) < 0.015
    # t is the max of two i.i.d. logit-normals: CDF F(t)^2.
    cdf = lambda x: stats.norm(loc=-0.4, scale=1.0).cdf(math.log(x / (1 - x))) ** 2  # noqa: E731
    import numpy as np
    assert stats.kstest(t.double().numpy(), np.vectorize(cdf)).pvalue > 0.01


def test_ect_curriculum():
    assert ts.ect_ratio(0, total_iterations=800, num_stages=8) == 0.5
    assert ts.ect_ratio(100, total_iterations=800, num_stages=8) == 0.25
    assert ts.ect_ratio(799, total_iterations=800, num_stages=8) == 0.5**8
    t, r = ts.sample_t_r_ect((100,), iteration=100, total_iterations=800, generator=_gen())
    torch.testing.assert_close(r, t * 0.75)


def test_ect_sigmoid_mapping_is_ects():
    """r = max(0, t - t n (1 + 8 sigmoid(-t))): checked value by value against the closed form, with the clamp
    where the widened gap exceeds t (small t, early stages) and r -> t (1 - n) for large t."""
    for iteration, n in ((0, 0.5), (100, 0.25), (799, 0.5**8)):
        t, r = ts.sample_t_r_ect((4000,), iteration=iteration, total_iterations=800, generator=_gen(iteration),
                                 dtype=torch.float64, mapping="sigmoid")
        expected = [max(0.0, x - x * n * (1 + 8 / (1 + math.exp(x)))) for x in t.tolist()]
        torch.testing.assert_close(r, torch.tensor(expected, dtype=torch.float64))
        assert bool((r < t).all())
        if n == 0.5:  # at t -> 0 the gap is (1 + 4) n t > t: clamped to the data
            assert bool((r[t < 0.1] == 0).all()) and bool((r == 0).any())
    with pytest.raises(ValueError, match="mapping"):
        ts.sample_t_r_ect((2,), iteration=0, total_iterations=8, mapping="cosine")


def test_generator_reproducible_and_bad_args():
    a = ts.sample_logit_normal((5,), generator=_gen(3))
    b = ts.sample_logit_normal((5,), generator=_gen(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="shift"):
        ts.sample_shifted((3,), shift=0.0)
    with pytest.raises(ValueError, match="t_list"):
        ts.sample_from_list((3,), [0.5])
    with pytest.raises(ValueError, match="base"):
        ts.sample_shifted((3,), base="cosine")


def test_trigflow_time_is_logit_normal_on_the_rf_path():
    """t = arctan(e^n / sigma_d): on the RF path (t_rf = k / (1 + k), k = sigma_d tan t) that is sigmoid(n)."""
    from diffusers_fastgen.timesteps import sample_trigflow_time

    t = sample_trigflow_time((20000,), sigma_d=0.75, mean=-0.8, std=1.6, generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
    assert bool((t > 0).all() and (t < torch.pi / 2).all())
    k = 0.75 * torch.tan(t)
    logits = torch.logit(k / (1 + k)).numpy()
    assert stats.kstest(logits, stats.norm(loc=-0.8, scale=1.6).cdf).pvalue > 0.01
    with pytest.raises(ValueError, match="sigma_d"):
        sample_trigflow_time((2,), sigma_d=0.0)


def test_trigflow_time_inside_a_vp_schedules_ratio_range_is_the_truncated_log_normal():
    """With the SD1.5 VP schedule's ratio range (0.029 .. 14.6) every draw stays inside it and log(sigma_d tan t)
    follows the normal truncated there (scipy's truncnorm), over several seeds; (0, inf) keeps the plain draw."""
    from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas
    from diffusers_fastgen.timesteps import noise_ratio_range, sample_trigflow_time

    low, high = noise_ratio_range(vp_from_betas())
    assert abs(low - 0.02917) < 1e-4 and abs(high - 14.6146) < 1e-3
    assert noise_ratio_range(RectifiedFlow()) == (0.0, float("inf"))
    mean, std, sd = -1.0, 1.4, 0.5
    a, b = (math.log(low) - mean) / std, (math.log(high) - mean) / std
    for seed in range(3):
        t = sample_trigflow_time((20000,), sigma_d=sd, mean=mean, std=std, ratio_range=(low, high), dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(seed))
        n = torch.log(sd * torch.tan(t))
        assert float(n.min()) >= math.log(low) - 1e-9 and float(n.max()) <= math.log(high) + 1e-9
        assert stats.kstest(n.numpy(), stats.truncnorm(a, b, loc=mean, scale=std).cdf).pvalue > 0.01
    plain = sample_trigflow_time((5,), sigma_d=sd, generator=torch.Generator().manual_seed(0))
    same = sample_trigflow_time((5,), sigma_d=sd, ratio_range=(0.0, float("inf")), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, same, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ratio_range"):
        sample_trigflow_time((2,), ratio_range=(1.0, 0.5))


def test_ect_pairs_on_a_vp_schedule_stay_ordered_where_the_ratio_is_out_of_its_range():
    """SD1.5's VP schedule spans noise ratios 0.029 .. 14.6: ECT's log-normal(-1.1, 2) draws outside that span
    used to map t and r to the same end (t = r = 0 or 1, a 0 / 0 loss: NaN at the first step of train_cm on a
    stock SD teacher). Several draws, every stage's gap; inside the span the times are unchanged."""
    from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas

    vp = vp_from_betas()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for iteration in (0, 700, 1499):
            sigma, sigma_r = ts.sample_t_r_ect((4096,), iteration=iteration, total_iterations=1500, num_stages=4,
                                               mean=-1.1, std=2.0, dtype=torch.float64, generator=g)
            old_t, old_r = vp.t_from_noise_ratio(sigma).float(), vp.t_from_noise_ratio(sigma_r).float()
            assert bool((old_t <= old_r).any())  # the collisions the old mapping produced
            t, r = ts.times_from_noise_ratios(vp, sigma, sigma_r / sigma)
            assert bool((r < t).all()) and bool((r >= 0).all()) and bool((t <= 1).all())
            inside = (sigma > 0.03) & (sigma < 14.0)
            torch.testing.assert_close(t[inside], old_t[inside])
            torch.testing.assert_close(r[inside & (sigma_r > 0.03)], old_r[inside & (sigma_r > 0.03)])
    rf = RectifiedFlow()  # the whole ratio axis: nothing clamps
    sigma = torch.exp(torch.randn(1000, dtype=torch.float64) * 2)
    t, r = ts.times_from_noise_ratios(rf, sigma, 0.5)
    torch.testing.assert_close(t, rf.t_from_noise_ratio(sigma).float())
    torch.testing.assert_close(r, rf.t_from_noise_ratio(sigma * 0.5).float())


def test_log_student_t_is_the_truncated_student_t_in_log_sigma():
    """log sigma = mean + std T, T ~ t(df), truncated to ratio_range: KS against scipy's t restricted to the
    window (its CDF renormalised there), over several seeds and two df; every draw inside the window."""
    low, high = 0.667, 80.0
    for df in (2.0, 5.0):
        a, b = stats.t.cdf((math.log(low) + 1.1) / 2.0, df), stats.t.cdf((math.log(high) + 1.1) / 2.0, df)
        for seed in range(3):
            sigma = ts.sample_log_student_t((20000,), mean=-1.1, std=2.0, df=df, ratio_range=(low, high),
                                            dtype=torch.float64, generator=_gen(seed))
            assert float(sigma.min()) >= low and float(sigma.max()) <= high
            z = (torch.log(sigma).numpy() + 1.1) / 2.0
            assert stats.kstest(z, lambda x, df=df, a=a, b=b: (stats.t.cdf(x, df) - a) / (b - a)).pvalue > 0.01
    # heavier tails than the log-normal of the same (mean, std): more mass far above the mean
    t_tail = ts.sample_log_student_t((20000,), mean=-1.1, std=2.0, df=2.0, generator=_gen(0), dtype=torch.float64)
    n_tail = ts.sample_log_normal((20000,), mean=-1.1, std=2.0, generator=_gen(0), dtype=torch.float64)
    far = -1.1 + 3 * 2.0
    assert float((torch.log(t_tail) > far).double().mean()) > 5 * float((torch.log(n_tail) > far).double().mean())
    with pytest.raises(ValueError, match="df"):
        ts.sample_log_student_t((2,), df=0.0)
    with pytest.raises(ValueError, match="ratio_range"):
        ts.sample_log_student_t((2,), ratio_range=(2.0, 1.0))
