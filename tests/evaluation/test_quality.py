"""FID / CLIP score plumbing (evaluation.quality, `diffusers-fastgen quality`): checked against closed forms
and against the same models called directly, on tiny random weights."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, Dinov2Config, Dinov2Model

from diffusers_fastgen.cli import main as cli_main
from diffusers_fastgen.evaluation.quality import clip_score, fid
from diffusers_fastgen.evaluation.text_digits import build_clip_tokenizer


class PixelFeatures(torch.nn.Module):
    """The features of an image are its first row's pixel values, so a folder's features are whatever
    values were written into it."""

    num_features = 4

    def forward(self, images):
        return images[:, 0, 0, :4].double()


def write_images(folder, rows: np.ndarray, size: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        image = np.zeros((size, size, 3), np.uint8)
        image[0, :4, 0] = row
        Image.fromarray(image).save(folder / f"image_{i:04d}.png")
    return str(folder)


def closed_form_fd(mu1, cov1, mu2, cov2) -> float:
    root = linalg.sqrtm(cov1 @ cov2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root))


def test_fid_matches_closed_form_for_gaussians(tmp_path):
    """Features drawn from two known Gaussians: FD equals the closed form of the sample moments (exactly, up to
    float error) and approaches the population closed form."""
    rng = np.random.default_rng(0)
    n = 3000
    mu1, mu2 = np.array([100.0, 120, 90, 110]), np.array([104.0, 117, 90, 112])
    cov1, cov2 = np.diag([64.0, 100, 36, 81]), np.diag([100.0, 64, 49, 81])
    cov1[0, 1] = cov1[1, 0] = 30.0
    a = np.clip(np.round(rng.multivariate_normal(mu1, cov1, n)), 0, 255)
    b = np.clip(np.round(rng.multivariate_normal(mu2, cov2, n)), 0, 255)
    value = fid(write_images(tmp_path / "gen", a), write_images(tmp_path / "ref", b), features=PixelFeatures(),
                batch_size=256)
    sample = closed_form_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert value == pytest.approx(sample, rel=1e-6)
    population = closed_form_fd(mu1, cov1, mu2, cov2)
    assert population > 30
    assert value == pytest.approx(population, rel=0.15)
    same = fid(str(tmp_path / "ref"), str(tmp_path / "ref"), features=PixelFeatures())
    assert abs(same) < 1e-6


def test_fid_in_dinov2_features_equals_direct_computation(tmp_path):
    rng = np.random.default_rng(1)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model.save_pretrained(tmp_path / "dino")
    processor.save_pretrained(tmp_path / "dino")
    folders = []
    for name, shift in (("gen", 0), ("ref", 60)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(24):
            array = np.clip(rng.integers(0, 190, (20, 20, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i:03d}.png")
        folders.append(str(folder))
    value = fid(*folders, features="dinov2", weights=str(tmp_path / "dino"), batch_size=5)

    def features(folder):
        images = [Image.open(f"{folder}/{i:03d}.png") for i in range(24)]
        with torch.no_grad():
            return model(**processor(images=images, return_tensors="pt")).pooler_output.double().numpy()

    fa, fb = features(folders[0]), features(folders[1])
    direct = closed_form_fd(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert direct > 0.1
    assert value == pytest.approx(direct, rel=1e-3)


@pytest.fixture
def tiny_clip(tmp_path):
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": tokenizer.model_max_length,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return str(tmp_path / "clip"), model, processor


def test_clip_score_equals_direct_computation(tmp_path, tiny_clip):
    folder, model, processor = tiny_clip
    rng = np.random.default_rng(2)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3)).astype(np.uint8)).save(images / f"image_{i:03d}.png")
    prompts = ["a handwritten 7", "handwritten digit three", "a handwritten 0"]
    value = clip_score(str(images), prompts, weights=folder, batch_size=4)
    texts = [p for p in prompts for _ in range(2)]  # two images per prompt, in generate's order
    pil = [Image.open(images / f"image_{i:03d}.png") for i in range(6)]
    with torch.no_grad():
        out = model(**processor(text=texts, images=pil, return_tensors="pt", padding=True))
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    direct = (100 * (img * txt).sum(-1)).clamp_min(0).mean().item()
    assert value == pytest.approx(direct, abs=1e-3)
    with pytest.raises(ValueError, match="prompts"):
        clip_score(str(images), prompts[:2] + ["x", "y"], weights=folder)


def test_quality_cli(tmp_path, tiny_clip, capsys):
    folder = tiny_clip[0]
    rng = np.random.default_rng(3)
    images, ref = tmp_path / "images", tmp_path / "ref"
    for d in (images, ref):
        d.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(d / f"{i}.png")
    assert cli_main(["quality", "--images", str(images), "--reference", str(ref), "--features", "clip",
                     "--feature_weights", folder, "--clip_model", folder, "--prompt", "a handwritten 7"]) == 0
    out = capsys.readouterr().out
    assert "FD (clip)" in out and "CLIP score" in out
    expected = fid(str(images), str(ref), features="clip", weights=folder)
    assert f"{expected:.4f}" in out
    bad = [
        (["--reference", str(ref), "--features", "inception", "--feature_weights", str(tmp_path / "none.pth")],
         "weights"),
        (["--reference", str(tmp_path / "missing")], "reference"),
        (["--reference", str(ref), "--features", "dinov2", "--feature_weights", str(tmp_path / "no_folder")],
         "weights"),
        (["--clip_model", folder], "prompt"),
        ([], "nothing to compute"),
    ]
    for extra, word in bad:
        assert cli_main(["quality", "--images", str(images), *extra]) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["quality", "--images", str(empty), "--reference", str(ref), "--features", "clip",
                     "--feature_weights", folder]) == 2
    assert "no image" in capsys.readouterr().err
