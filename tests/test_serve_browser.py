"""`diffusers-fastgen serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed
by the README test command) fills the form, clicks Generate, and the image in the page decodes to exactly the
pipeline's own output for that seed."""

import base64
import io
import os
import socket
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from diffusers_fastgen.cli import main
from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.generate import load_pipeline
from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler
from diffusers_fastgen.serve import _to_uint8, build_app, sample, stream_video
from diffusers_fastgen.testing import tiny as T

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _fill(driver, wait, element_id: str, value: str) -> None:
    field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{element_id} input, #{element_id} textarea"))
    field.clear()
    field.send_keys(value)


def _image_bytes(src: str) -> bytes:
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    with urllib.request.urlopen(src) as response:
        return response.read()


def test_the_page_shows_the_pipelines_own_image_for_the_seed(browser, tmp_path):
    pipe = load_pipeline(DIGITS_TEACHER_PATH)
    teacher = load_pipeline(DIGITS_TEACHER_PATH)
    app = build_app(pipe, teacher=teacher, title="digits")
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        for seed in (11, 12):  # two draws: the page follows the seed
            _fill(browser, wait, "condition", "7")
            _fill(browser, wait, "steps", "4")
            _fill(browser, wait, "seed", str(seed))
            previous = {e.get_attribute("src") for e in browser.find_elements(By.CSS_SELECTOR, "#output img")}
            browser.find_element(By.CSS_SELECTOR, "#generate button, button#generate").click()
            img = wait.until(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "#output img")
                                             if e.get_attribute("src") and e.get_attribute("src") not in previous), None))
            got = np.asarray(Image.open(io.BytesIO(_image_bytes(img.get_attribute("src")))).convert("RGB"))
            expected = _to_uint8(sample(pipe, label=7, steps=4, seed=seed))
            np.testing.assert_array_equal(got, expected)
            latency = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#teacher_latency textarea, #teacher_latency input")
                                 .get_attribute("value"))
            assert latency.endswith(" s")
        browser.save_screenshot(str(tmp_path / "serve.png"))
        assert os.path.getsize(tmp_path / "serve.png") > 1000
    finally:
        app.close()


def test_serve_refuses_a_port_in_use_and_a_non_pipeline_folder(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", DIGITS_TEACHER_PATH, "--port", str(port)]) == 2
    assert f"`port` {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "without model_index.json" in capsys.readouterr().err


def test_video_frames_stream_into_the_page_block_by_block():
    tok = T.tiny_tokenizer(model_max_length=8)
    pipe = CausalWanPipeline(transformer=T.tiny_wan_transformer(num_layers=1), scheduler=FlowMatchFewStepScheduler(),
                             tokenizer=tok, text_encoder=T.tiny_t5_text_encoder(tok, umt5=True), num_frames_per_block=1,
                             denoising_timesteps=[1000, 500])
    shown = list(stream_video(pipe, prompt="a red cat", seed=4, num_frames=3, height=4, width=4))
    assert [len(f) for f in shown] == [1, 2, 3]  # one more frame in the page per finished block
    torch.manual_seed(4)
    full = pipe(["a red cat"], num_frames=3, height=4, width=4, generator=torch.Generator().manual_seed(4),
                output_type="np").frames[0]
    np.testing.assert_allclose(shown[-1], full, atol=1e-6)
