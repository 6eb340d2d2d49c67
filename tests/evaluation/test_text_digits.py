"""The text-to-image digits benchmark: exact pixel mapping, a stock CLIP tokenizer that keeps every prompt
word whole, held-out phrasings only in the benchmark prompts, a scorer that puts the held-out digits themselves
at the floor, and the shipped StableDiffusionPipeline teacher."""

import os
import types

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference
from diffusers_fastgen.evaluation.digits_data import load_digits_arrays
from diffusers_fastgen.evaluation.text_digits import (
    HELD_OUT_PHRASINGS,
    NUMBER_WORDS,
    TEXT_DIGITS_TEACHER_PATH,
    TRAIN_PHRASINGS,
    benchmark_prompts,
    build_clip_tokenizer,
    clip_vocabulary,
    digit_prompt,
    score_text_digits_pipeline,
    to_digits,
    to_pixels,
)


def test_pixels_round_trip_exactly_and_bad_shapes_are_named():
    x = torch.from_numpy(load_digits_arrays("held_out")[0][:50])
    pixels = to_pixels(x)
    assert pixels.shape == (50, 3, 16, 16)
    assert torch.equal(pixels[:, :, ::2, ::2], x.expand(-1, 3, -1, -1))  # nearest 2x: each pixel a 2x2 block
    torch.testing.assert_close(to_digits(pixels), x, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="digits"):
        to_pixels(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="images"):
        to_digits(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="label"):
        digit_prompt(10, TRAIN_PHRASINGS[0])


def test_tokenizer_is_stock_clip_and_keeps_every_prompt_word_whole(tmp_path):
    tok = build_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for phrasing in TRAIN_PHRASINGS + HELD_OUT_PHRASINGS:
        for label in range(10):
            prompt = digit_prompt(label, phrasing)
            ids = tok(prompt).input_ids
            words = prompt.replace(",", " ,").split()
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words], prompt
    assert len(tok("the handwritten number 7", padding="max_length").input_ids) == tok.model_max_length == 16
    assert tok.pad_token_id == tok.eos_token_id  # SD1.5's convention


def test_benchmark_prompts_are_balanced_and_held_out():
    prompts, labels = benchmark_prompts(1000)
    assert np.bincount(labels).tolist() == [100] * 10
    train = {digit_prompt(c, p) for c in range(10) for p in TRAIN_PHRASINGS}
    assert not set(prompts) & train
    for phrasing in HELD_OUT_PHRASINGS:  # both phrasings, every class
        assert {digit_prompt(c, phrasing) for c in range(10)} <= set(prompts)
    assert all(NUMBER_WORDS[c] in p or str(c) in p for p, c in zip(prompts, labels))


def test_benchmark_prompts_in_other_phrasings():
    """The held-out phrasings' training twins (numeral and word swapped back): every prompt is a training prompt,
    prompt i names class i mod 10 in phrasing (i // 10) mod 2; a template without exactly one slot is refused."""
    twins = ("a handwritten {w}", "handwritten digit {n}")
    prompts, labels = benchmark_prompts(40, twins)
    assert set(twins) <= set(TRAIN_PHRASINGS)
    assert prompts[:12] == [f"a handwritten {NUMBER_WORDS[c]}" for c in range(10)] + ["handwritten digit 0",
                                                                                       "handwritten digit 1"]
    assert labels.tolist() == [i % 10 for i in range(40)]
    for bad in ((), ("a digit",), ("{n} or {w}",)):
        with pytest.raises(ValueError, match="phrasings"):
            benchmark_prompts(10, bad)


def _bench_module(name: str = "text_digits"):
    """benchmarks/<name>.py imported as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_guidance_window_sets_each_steps_scale():
    """benchmarks/text_digits.py --guidance_windows 4,300,700 on DDIM's 10 steps (999, 899, ..., 99 trailing):
    CFG 4 exactly at the steps whose timestep is in (300, 700], 'off' (1 + 1e-6, the CFG batch kept) elsewhere."""
    bench = _bench_module()
    pipe = type("P", (), {})()
    pipe.scheduler = DDIMScheduler(timestep_spacing="trailing")
    call = bench.guidance_window_call(pipe, "4,300,700", 10)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    used = [call["guidance_scale"]]
    for i in range(len(timesteps) - 1):  # the pipeline calls back after step i; step i + 1 reads the scale
        call["callback_on_step_end"](pipe, i, timesteps[i], {})
        used.append(pipe._guidance_scale)
    assert used == [4.0 if 300 < t <= 700 else 1.0 + 1e-6 for t in timesteps] and used.count(4.0) == 4
    for bad in ("4,7", "0.5,0,500", "4,nan,700", "4,700,300"):
        with pytest.raises(ValueError, match="guidance_windows"):
            bench.parse_guidance_window(bad)


def test_benchmark_rows_average_every_metric_and_print_excess_over_the_floor():
    """benchmarks/text_digits.py: mean and sample std over seeds of FD, KID, precision, recall, accuracy and
    diversity; excess FD = row FD - floor FD; KID printed x1e3, accuracy in %."""
    bench = _bench_module()
    seeds = [dict(fd=0.5, kid=0.001, precision=0.8, recall=0.7, accuracy=0.98, diversity=1.0),
             dict(fd=0.7, kid=0.003, precision=0.9, recall=0.9, accuracy=0.96, diversity=0.9)]
    row = bench.mean_over_seeds(seeds, {"model": "m", "nfe": 1, "s_per_1k": 2.0})
    assert row["fd"] == pytest.approx(0.6) and row["fd_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert row["recall"] == pytest.approx(0.8) and row["kid"] == pytest.approx(0.002)
    floor = bench.mean_over_seeds([dict(seeds[0], fd=0.45), dict(seeds[0], fd=0.47)], {"model": "f", "nfe": 0,
                                                                                         "s_per_1k": 0.0})
    cells = [c.strip() for c in bench.fmt(row, floor).strip("|").split("|")]
    assert len(cells) == len(bench.COLUMNS) == bench.HEADER.splitlines()[0].count("|") - 1
    named = dict(zip(bench.COLUMNS, cells))
    assert named["excess_fd"] == "0.14" and named["fd"] == "0.60 ± 0.14"
    assert named["kid"] == "2.00 ± 1.41" and named["accuracy"] == "97.0 ± 1.41%" and named["model"] == "m"


class _Replay:
    """A pipeline stand-in returning given digits for the prompts' classes (images in [0, 1], like
    output_type="pt")."""

    def __init__(self, digits, labels):
        self.by_class = {c: to_pixels(torch.from_numpy(digits[labels == c])) for c in range(10)}
        self.seen = {c: 0 for c in range(10)}
        self.calls = []

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, prompts, **kwargs):
        self.calls.append(kwargs)
        out = []
        for p in prompts:
            c = next(c for c in range(10) if NUMBER_WORDS[c] in p.split(",")[0].split() or str(c) in p.split())
            pool = self.by_class[c]
            out.append(pool[self.seen[c] % len(pool)])
            self.seen[c] += 1
        return types.SimpleNamespace(images=(torch.stack(out) + 1) / 2)


def test_scorer_puts_the_reference_digits_at_the_floor_and_shuffled_labels_at_chance():
    reference = DigitsReference()
    held, labels = load_digits_arrays("held_out")
    row = score_text_digits_pipeline(_Replay(held, labels), reference, name="held-out", num_samples=360,
                                     num_inference_steps=4, guidance_scale=2.0)
    # balanced classes resample the held-out digits (36 per class vs 27..43 held): below the train-vs-held 0.48
    assert row["nfe"] == 8 and row["accuracy"] > 0.97 and row["fd"] < 0.3
    rng = np.random.default_rng(0)
    row = score_text_digits_pipeline(_Replay(held, rng.permutation(labels)), reference, name="shuffled",
                                     num_samples=360, num_inference_steps=1)
    assert row["accuracy"] < 0.3


def test_shipped_teacher_is_a_small_stock_sd_pipeline_that_draws_the_prompted_digit():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TEXT_DIGITS_TEACHER_PATH) for f in fs)
    assert size <= 8 * 2**20
    pipe = DiffusionPipeline.from_pretrained(TEXT_DIGITS_TEACHER_PATH)
    assert type(pipe) is StableDiffusionPipeline and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.get_vocab() == clip_vocabulary()[0]  # the vocabulary this module builds
    # a held-out phrasing (the benchmark's prompts, never in training) is followed
    prompts = [digit_prompt(c, HELD_OUT_PHRASINGS[0]) for c in range(10)] * 10
    images = pipe(prompts, num_inference_steps=25, guidance_scale=2.0, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    row = DigitsReference().score(to_digits(images * 2 - 1), np.arange(100) % 10)
    assert row["accuracy"] > 0.95, row


def test_shipped_text_encoder_places_held_out_phrasings_at_their_class():
    """The teacher's CLIP text encoder is pretrained (contrastively, on training phrasings only): a prompt in a
    held-out phrasing is nearest to its own class among the class centroids of the training phrasings' mean
    hidden states. (A seeded random CLIPTextModel of the same shape places 8 of the 20 there.)"""
    pipe = DiffusionPipeline.from_pretrained(TEXT_DIGITS_TEACHER_PATH)

    @torch.no_grad()
    def embed(phrasings):
        prompts = [digit_prompt(c, p) for p in phrasings for c in range(10)]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return pipe.text_encoder(ids).last_hidden_state.mean(1).view(len(phrasings), 10, -1)

    centroids = embed(TRAIN_PHRASINGS).mean(0)
    held = embed(HELD_OUT_PHRASINGS).flatten(0, 1)
    assert torch.equal(torch.cdist(held, centroids).argmin(1), torch.arange(10).repeat(len(HELD_OUT_PHRASINGS)))


def test_shipped_prompt_file_is_every_training_phrasing_of_every_class():
    from diffusers_fastgen.evaluation.text_digits import TEXT_DIGITS_PROMPTS_PATH
    from diffusers_fastgen.training.teachers import load_prompts

    prompts = load_prompts(TEXT_DIGITS_PROMPTS_PATH)
    assert sorted(prompts) == sorted(digit_prompt(c, p) for p in TRAIN_PHRASINGS for c in range(10))


def test_imagefolder_holds_every_training_digit_in_every_training_phrasing(tmp_path):
    import json

    from PIL import Image

    from diffusers_fastgen.evaluation.text_digits import write_imagefolder

    n = write_imagefolder(str(tmp_path / "images"))
    images, labels = load_digits_arrays("train")
    assert n == len(images) * len(TRAIN_PHRASINGS)
    rows = [json.loads(line) for line in open(tmp_path / "images" / "metadata.jsonl")]
    assert len(rows) == n and len({(r["file_name"], r["text"]) for r in rows}) == n
    for r in rows[:20]:
        i = int(r["file_name"][:4])
        assert r["text"] in {digit_prompt(labels[i], p) for p in TRAIN_PHRASINGS}
        pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "images" / r["file_name"]), dtype=np.float32))
        expected = to_pixels(torch.from_numpy(images[i:i + 1]))[0].permute(1, 2, 0)
        torch.testing.assert_close(pixels / 127.5 - 1, expected, rtol=0, atol=1 / 127.5)
    with pytest.raises(ValueError, match="already holds"):
        write_imagefolder(str(tmp_path / "images"))


def test_eval_checkpoint_scores_a_text_to_image_checkpoints_ema_and_raw_unets(tmp_path, monkeypatch, capsys):
    """benchmarks/eval_checkpoint.py on a text-to-image run: the checkpoint's EMA UNet (here the teacher's own
    weights) inside the teacher's pipeline with the student's LCMScheduler at the run's told timestep scores
    exactly what that stock pipeline scores; the raw file (another UNet) scores differently."""
    import yaml
    from safetensors.torch import save_file

    from diffusers_fastgen.schedulers import lcm_scheduler

    teacher = StableDiffusionPipeline.from_pretrained(TEXT_DIGITS_TEACHER_PATH)
    state = {k: v.contiguous() for k, v in teacher.unet.state_dict().items()}
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "ema_student.safetensors"))
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    (tmp_path / "run" / "train_config.yaml").write_text(yaml.safe_dump(
        {"pretrained_model_name_or_path": TEXT_DIGITS_TEACHER_PATH, "student_times": [0.7007], "lora_rank": 0}))
    bench = _bench_module("eval_checkpoint")
    monkeypatch.setattr("sys.argv", ["eval_checkpoint.py", "--run", str(tmp_path / "run"), "--checkpoint",
                                     "checkpoint-5", "--steps", "1", "--num_samples", "40", "--seeds", "3"])
    bench.main()
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if "checkpoint-5" in line}
    teacher.scheduler = lcm_scheduler(teacher.scheduler)
    want = score_text_digits_pipeline(teacher, name="", num_samples=40, seed=3, timesteps=[700],
                                      num_inference_steps=1, guidance_scale=1.0)
    assert float(rows["checkpoint-5 ema"][6]) == pytest.approx(want["fd"], abs=0.006)
    assert abs(float(rows["checkpoint-5 raw"][6]) - want["fd"]) > 0.05


def test_text_digits_benchmark_swaps_in_the_named_scheduler_and_passes_eta(monkeypatch, capsys):
    """benchmarks/text_digits.py --scheduler TCDScheduler --eta 0.7 scores exactly the stock pipeline with TCDScheduler
    built from the saved scheduler's config, called with eta=0.7 (a different eta scores differently); a name that is
    not a diffusers scheduler and an eta outside [0, 1] are refused before any sampling."""
    from diffusers import TCDScheduler

    bench = _bench_module()
    argv = ["text_digits.py", "--student", TEXT_DIGITS_TEACHER_PATH, "--num_inference_steps", "2", "--num_samples", "40",
            "--seeds", "3", "--name", "probe"]
    monkeypatch.setattr("sys.argv", [*argv, "--scheduler", "TCDScheduler", "--eta", "0.7"])
    bench.main()
    row = next(line.split("|") for line in capsys.readouterr().out.splitlines() if "probe" in line)
    pipe = StableDiffusionPipeline.from_pretrained(TEXT_DIGITS_TEACHER_PATH)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    want = [score_text_digits_pipeline(pipe, name="", num_samples=40, seed=3, num_inference_steps=2, guidance_scale=1.0,
                                       eta=eta)["fd"] for eta in (0.7, 0.0)]
    assert float(row[4].split("±")[0]) == pytest.approx(want[0], abs=0.006)
    assert abs(want[0] - want[1]) > 0.05
    for extra, match in ((["--scheduler", "StableDiffusionPipeline"], "--scheduler"), (["--eta", "1.5"], "--eta"),
                         (["--eta", "nan"], "--eta")):
        monkeypatch.setattr("sys.argv", [*argv, *extra])
        with pytest.raises(ValueError, match=match):
            bench.main()
