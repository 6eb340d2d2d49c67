"""The causal-video scripts on a stock WanPipeline teacher (tiny, saved to a temporary folder): prompts
through WanPipeline.encode_prompt, latent shapes from the VAE factors, the per-block schedule on the teacher's
shift, and a CausalWanPipeline of stock Wan components that conditions the student as it was trained."""

import json
import os

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from script_utils import run_script

from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training.video_teachers import WanTeacher


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    T.tiny_pipeline("wan", UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0)).save_pretrained(root / "wan")
    (root / "prompts.txt").write_text("a red cat\na blue dog on the horse\nthree green apples\n")
    return str(root / "wan"), str(root / "prompts.txt")


def _argv(wan, out, *extra):
    return ["--pretrained_model_name_or_path", wan[0], "--prompts", wan[1], "--num_frames", "9", "--height", "32",
            "--width", "32", "--num_frames_per_block", "1", "--num_student_steps", "2", "--output_dir", out,
            "--max_train_steps", "2", "--train_batch_size", "2", "--student_update_freq", "2", "--report_to", "none",
            "--eval_num_videos", "0", "--guidance_scale", "2", "--learning_rate", "1e-3", *extra]


def test_self_forcing_on_a_wan_pipeline(wan, tmp_path):
    out = str(tmp_path / "sf")
    run_script("self_forcing", _argv(wan, out))
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    # Stock Wan components beside the student; the recipe on the teacher's flow_shift 3: t = 3u / (1 + 2u).
    assert index["text_encoder"][1] == "UMT5EncoderModel" and index["vae"][1] == "AutoencoderKLWan"
    assert index["denoising_timesteps"] == [1000.0, 750.0] and index["num_frames_per_block"] == 1
    pipe = CausalWanPipeline.from_pretrained(out)
    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    assert teacher.latent_shape == (16, 3, 4, 4)  # 9 frames -> 1 + 8/4; 32 px / 8
    trained, base = pipe.transformer.state_dict(), teacher.model.state_dict()
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    # The saved pipeline's own prompt encoding is the conditioning the student was trained on.
    prompts = ["a red cat", "three green apples"]
    torch.testing.assert_close(pipe.encode_prompt(prompts), teacher._encode(prompts)["encoder_hidden_states"])
    video = pipe(prompts[:1], num_frames=3, height=4, width=4, output_type="np").frames
    assert video.shape == (1, 9, 32, 32, 3) and os.path.isfile(os.path.join(out, "samples.gif"))


@pytest.mark.parametrize("extra,match", [
    (["--num_frames", "8"], "1 \\+ a multiple of the VAE's temporal factor 4"),
    (["--height", "20"], "multiple of 16"),
    (["--num_frames_per_block", "2"], "does not divide the 3 latent frames"),
])
def test_bad_video_arguments_are_named(wan, tmp_path, extra, match):
    argv = _argv(wan, str(tmp_path / "bad"))
    for i in range(0, len(extra), 2):
        argv[argv.index(extra[i]) + 1] = extra[i + 1]
    with pytest.raises(ValueError, match=match):
        run_script("self_forcing", argv)
    assert not os.path.exists(tmp_path / "bad")  # before any work


def test_a_non_wan_pipeline_is_refused(wan, tmp_path):
    from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH

    argv = _argv(wan, str(tmp_path / "x"))
    argv[1] = DIGITS_TEACHER_PATH
    with pytest.raises(ValueError, match="is a DigitsPipeline; the causal-video scripts take"):
        run_script("self_forcing", argv)
    assert not os.path.exists(tmp_path / "x")


def test_causal_kd_pairs_sit_on_the_students_shifted_schedule(wan, tmp_path):
    """The teacher ODE pairs: states at the warped t_list ([1, 0.75] on shift 3) from the stored noise, reached by
    teacher_steps / K guided Euler steps per interval (recomputed here with the CFG formula by hand)."""
    from safetensors.torch import load_file

    from diffusers_fastgen.models import Denoiser

    out = str(tmp_path / "ckd")
    argv = _argv(wan, out, "--teacher_steps", "4", "--num_pairs", "3", "--pair_batch_size", "3")
    i = argv.index("--student_update_freq")  # not a CausalKD flag
    del argv[i:i + 2]
    run_script("causal_kd", argv)
    pairs = load_file(os.path.join(out, "ode_pairs.safetensors"))
    noise = torch.randn(3, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(pairs["states"][:, 0], noise)
    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    emb, neg = teacher.embed_prompts(["a red cat", "a blue dog on the horse", "three green apples"])
    den = Denoiser(teacher.model)
    x = noise
    with torch.no_grad():
        for t, t_next in zip(torch.linspace(1.0, 0.75, 3)[:-1], torch.linspace(1.0, 0.75, 3)[1:]):
            c = den(x, t, {"encoder_hidden_states": emb["encoder_hidden_states"]}, target="flow")
            u = den(x, t, {"encoder_hidden_states": neg["encoder_hidden_states"].expand(3, -1, -1)}, target="flow")
            x = x + (t_next - t) * (u + 2.0 * (c - u))
    torch.testing.assert_close(pairs["states"][:, 1], x, atol=1e-5, rtol=1e-5)
    assert CausalWanPipeline.from_pretrained(out).config.denoising_timesteps == [1000.0, 750.0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Captioned videos in the folder layout: three 9-frame GIFs (one 40x48, cropped to 32x32) and a frame folder."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    rows = []
    for i, (caption, size) in enumerate([("a red cat", (32, 32)), ("a blue dog on the horse", (40, 48)),
                                         ("three green apples", (32, 32))]):
        frames = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(10)]
        frames[0].save(root / f"{i}.gif", save_all=True, append_images=frames[1:], duration=50)
        rows.append({"file_name": f"{i}.gif", "text": caption})
    (root / "clip").mkdir()
    for k in range(9):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "clip" / f"{k:03d}.png")
    rows.append({"file_name": "clip", "text": "a small digit"})
    from diffusers.utils import export_to_video  # an MP4 as well (read back through imageio-ffmpeg)

    export_to_video([rng.integers(0, 255, (32, 32, 3)).astype(np.float32) / 255 for _ in range(9)],
                    str(root / "clip.mp4"), fps=8)
    rows.append({"file_name": "clip.mp4", "text": "the big one"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def _video_argv(wan, videos, out, *extra, script="causvid"):
    argv = _argv(wan, out, *extra)
    argv[argv.index("--prompts"):argv.index("--prompts") + 2] = ["--train_data_dir", videos]
    if script == "causal_sft":
        for flag in ("--num_student_steps", "--student_update_freq", "--guidance_scale"):  # not CausalSFT flags
            i = argv.index(flag)
            del argv[i:i + 2]
    return argv


def test_video_folder_latents_are_the_wan_vae_encoding(wan, videos, tmp_path):
    """GIFs and frame folders are read, center-cropped and encoded as (z - latents_mean) / latents_std with a seeded
    posterior draw; captions by WanPipeline.encode_prompt."""
    import numpy as np
    from PIL import Image, ImageSequence

    from diffusers_fastgen.training.image_data import LatentShards
    from diffusers_fastgen.training.video_data import encode_video_dataset

    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    shards = LatentShards(encode_video_dataset(teacher, train_data_dir=videos, out_dir=str(tmp_path), shard_size=3))
    assert len(shards) == 5 and shards.first_captions[1] == "a blue dog on the horse"
    rows = shards.rows(torch.arange(5))
    assert rows["latents"].shape == (5, 16, 3, 4, 4)
    with Image.open(os.path.join(videos, "0.gif")) as gif:  # by hand: frames 0-8 of the GIF in [-1, 1]
        frames = [np.asarray(f.convert("RGB"), dtype=np.float32) for f in ImageSequence.Iterator(gif)][:9]
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)[None] / 127.5 - 1
    vae = teacher.pipe.vae
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(rows["latents"][:1], (z - mean) / std, atol=1e-5, rtol=1e-5)
    captions = ["a red cat", "a blue dog on the horse", "three green apples", "a small digit", "the big one"]
    torch.testing.assert_close(rows["encoder_hidden_states"], teacher._encode(captions)["encoder_hidden_states"])


@pytest.mark.parametrize("script", ["causal_sft", "causvid", "self_forcing"])
def test_causal_sft_and_causvid_on_wan_videos_reload_and_stream(wan, videos, script, tmp_path):
    """CausalSFT and CausVid train on the encoded videos; Self-Forcing (data-free) takes their captions as prompts.
    Validation grids are sampled through the teacher's VAE."""
    out = str(tmp_path / script)
    argv = _video_argv(wan, videos, out, "--validation_steps", "2", script=script)
    if script == "causal_sft":
        argv += ["--sample_steps", "3", "--cond_dropout", "0.5"]
    run_script(script, argv)
    pipe = CausalWanPipeline.from_pretrained(out)
    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    trained, base = pipe.transformer.state_dict(), teacher.model.state_dict()
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    # The recipe sits on the teacher's flow_shift 3: t = 3u / (1 + 2u).
    u = torch.tensor([1.0, 2 / 3, 1 / 3] if script == "causal_sft" else [1.0, 0.5])
    expected = (3 * u / (1 + 2 * u) * 1000).tolist()
    assert pipe.config.denoising_timesteps == pytest.approx(expected, abs=1e-3)
    # Stock schedulers: Euler for the SFT teacher, x0-then-fresh-noise steps for the distilled student.
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.stochastic_sampling == (script != "causal_sft")
    assert os.listdir(os.path.join(out, "samples")) == ["step_000002.png"]
    blocks = list(pipe.stream(["a red cat"], num_frames=3, height=4, width=4))
    assert len(blocks) == 3 and all(torch.isfinite(b).all() for b in blocks)


def test_bad_video_folders_are_named(wan, videos, tmp_path):
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        run_script("causal_sft", _video_argv(wan, str(tmp_path), str(tmp_path / "x"), script="causal_sft"))
    with pytest.raises(ValueError, match="`caption_column` 'caption'"):
        run_script("causvid", _video_argv(wan, videos, str(tmp_path / "x"), "--caption_column", "caption"))
    with pytest.raises(ValueError, match="'0.gif' has 10 frames; `num_frames` is 13"):
        argv = _video_argv(wan, videos, str(tmp_path / "y"), "--sample_steps", "2", script="causal_sft")
        argv[argv.index("--num_frames") + 1] = "13"
        run_script("causal_sft", argv)
    assert not os.path.exists(tmp_path / "x")


def test_self_forcing_lora_on_a_bf16_wan_teacher(wan, tmp_path):
    """LoRA adapters (fp32) on the frozen bf16 teacher; the output folder is fp32 throughout, holds the merged student
    and its LoRA file, and streams."""
    from safetensors.torch import load_file

    out = str(tmp_path / "sf_lora")
    run_script("self_forcing", _argv(wan, out, "--lora_rank", "4", "--weight_dtype", "bf16"))
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert lora and {v.dtype for v in lora.values()} == {torch.float32}
    pipe = CausalWanPipeline.from_pretrained(out)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    assert len(list(pipe.stream(["a red cat"], num_frames=3, height=4, width=4))) == 3


def test_any_phase_is_a_moving_digits_option(wan, videos, tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match="`any_phase` is a moving-digits option"):
        run_script("causal_sft", _video_argv(wan, videos, out, "--any_phase", "true", script="causal_sft"))
    assert not os.path.exists(out)


def test_embedding_cache_gives_the_same_video_student_bit_for_bit(wan, tmp_path):
    """UMT5 embeddings read back from the cache (written by the first cached run, only read by the second) train
    the same Self-Forcing student as embedding the prompts in the run."""
    from safetensors.torch import load_file

    cache = str(tmp_path / "cache")
    for name, extra in [("plain", []), ("cached", ["--embeddings_cache", cache]), ("again", ["--embeddings_cache", cache])]:
        run_script("self_forcing", _argv(wan, str(tmp_path / name), "--encode_batch_size", "2", *extra))
        if name == "cached":
            files = sorted(os.path.join(root, f) for root, _, fs in os.walk(cache) for f in fs)
            assert files and all(f.endswith(".safetensors") for f in files)
            mtimes = {f: os.path.getmtime(f) for f in files}
    assert mtimes == {f: os.path.getmtime(f) for f in mtimes}  # the second cached run wrote nothing
    weights = [load_file(str(tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors"))
               for d in ("plain", "cached", "again")]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], weights[2][k])
    base = load_file(os.path.join(wan[0], "transformer", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(weights[0][k], base[k]) for k in base)  # it did train
