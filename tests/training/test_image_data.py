"""Real-image preprocessing and the latent shards: closed-form checks and resumable, index-exact shards."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training.image_data import LatentShards, encode_image_dataset, preprocess_image
from diffusers_fastgen.training.teachers import TextToImageTeacher


def test_preprocess_is_exact_on_an_image_of_the_right_size_and_flips_columns():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = preprocess_image(Image.fromarray(array), 8, center_crop=True, flip=False, rng=rng)
    torch.testing.assert_close(out, torch.from_numpy(array.astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
    flipped = preprocess_image(Image.fromarray(array), 8, center_crop=True, flip=True, rng=rng)
    torch.testing.assert_close(flipped, out.flip(-1))


def test_center_crop_takes_the_middle_after_resizing_the_shorter_side():
    # 8 x 16 (h x w) of constant columns: resizing 8 -> 8 keeps it, the center crop is columns 4..11.
    array = np.repeat(np.arange(16, dtype=np.uint8)[None, :, None] * 10, 8, 0).repeat(3, 2)
    out = preprocess_image(Image.fromarray(array), 8, center_crop=True, flip=False, rng=np.random.default_rng(0))
    torch.testing.assert_close(out[0, 0], torch.arange(4, 12, dtype=torch.float32) * 10 / 127.5 - 1)
    for seed in range(5):  # random crops are 8 consecutive columns starting anywhere in 0..8
        out = preprocess_image(Image.fromarray(array), 8, center_crop=False, flip=False, rng=np.random.default_rng(seed))
        start = round(float((out[0, 0, 0] + 1) * 127.5 / 10))
        torch.testing.assert_close(out[0, 0], torch.arange(start, start + 8, dtype=torch.float32) * 10 / 127.5 - 1)


@pytest.fixture
def sd_teacher(tmp_path):
    T.tiny_pipeline("sd", DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)).save_pretrained(
        tmp_path / "sd")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": ["a cat", "a dog", "two"][i % 3]}) + "\n")
    return TextToImageTeacher(str(tmp_path / "sd"), resolution=16), str(images)


def test_shards_hold_every_image_once_in_order_and_a_rerun_redoes_only_what_is_missing(sd_teacher, tmp_path):
    teacher, images = sd_teacher
    folder = encode_image_dataset(teacher, train_data_dir=images, shard_size=4, out_dir=str(tmp_path / "cache"))
    assert sorted(os.listdir(folder)) == ["complete.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    shards = LatentShards(folder)
    assert len(shards) == 6
    whole = [load_file(os.path.join(folder, f"shard-0000{i}.safetensors")) for i in range(2)]
    rows = shards.rows(torch.tensor([5, 0, 3, 4]))  # across both shards, any order
    expected = torch.cat([whole[0]["latents"], whole[1]["latents"]])[[5, 0, 3, 4]]
    assert torch.equal(rows["latents"], expected) and rows["encoder_hidden_states"].shape[0] == 4
    # Interrupted after shard 0: a rerun keeps it and writes shard 1 again, identically.
    first = os.path.getmtime(os.path.join(folder, "shard-00000.safetensors"))
    os.remove(os.path.join(folder, "complete.json"))
    os.remove(os.path.join(folder, "shard-00001.safetensors"))
    assert encode_image_dataset(teacher, train_data_dir=images, shard_size=4, out_dir=str(tmp_path / "cache")) == folder
    assert os.path.getmtime(os.path.join(folder, "shard-00000.safetensors")) == first
    again = load_file(os.path.join(folder, "shard-00001.safetensors"))
    assert all(torch.equal(again[k], whole[1][k]) for k in again)
    with pytest.raises(IndexError):
        shards.rows(torch.tensor([6]))


def test_latents_are_the_vae_posterior_scaled(sd_teacher, tmp_path):
    """Row i of the shards = (mean + std * draw) * scaling_factor of the VAE on the preprocessed image."""
    teacher, images = sd_teacher
    folder = encode_image_dataset(teacher, train_data_dir=images, shard_size=8, out_dir=str(tmp_path / "c"))
    got = LatentShards(folder).rows(torch.arange(6))["latents"]
    vae = teacher.pipe.vae
    pixels = torch.stack([preprocess_image(Image.open(os.path.join(images, f"{i}.png")), 16, center_crop=True, flip=False,
                                           rng=np.random.default_rng(0)) for i in range(6)])
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    draw = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))  # seed * 100003 + shard 0
    torch.testing.assert_close(got, (dist.mean + dist.std * draw) * vae.config.scaling_factor, atol=1e-5, rtol=1e-5)


def test_a_teacher_rebuilt_at_the_same_path_gets_new_caches_not_its_predecessors_encodings(tmp_path):
    """The latents and prompt-embedding caches are keyed on the encoders' files, not only the path: replacing the
    text encoder (or the VAE) in place must not hand back the old caption embeddings (or latents)."""
    T.tiny_pipeline("sd", DDPMScheduler()).save_pretrained(tmp_path / "sd")
    images = tmp_path / "images"
    images.mkdir()
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a cat"}) + "\n")

    def encode():
        teacher = TextToImageTeacher(str(tmp_path / "sd"), resolution=16)
        folder = encode_image_dataset(teacher, train_data_dir=str(images), out_dir=str(tmp_path / "cache"))
        cond, _ = teacher.embed_prompts(["a dog"], cache_dir=str(tmp_path / "emb"))
        fresh, _ = TextToImageTeacher(str(tmp_path / "sd"), resolution=16).embed_prompts(["a dog"])
        return folder, LatentShards(folder).rows(torch.arange(2)), cond, fresh

    folder, rows, cond, _ = encode()
    assert encode()[0] == folder  # unchanged files: the cache is reused
    for sub in ("text_encoder", "vae"):
        pipe = TextToImageTeacher(str(tmp_path / "sd"), resolution=16).pipe
        module = getattr(pipe, sub)
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.5)
        module.save_pretrained(tmp_path / "sd" / sub)
        new_folder, new_rows, new_cond, fresh = encode()
        assert new_folder != folder
        for k in fresh:  # the cached embeddings are the rebuilt encoder's, not the old ones
            torch.testing.assert_close(new_cond[k], fresh[k])
        changed = "encoder_hidden_states" if sub == "text_encoder" else "latents"
        assert not torch.allclose(new_rows[changed], rows[changed])
        folder, rows = new_folder, new_rows
