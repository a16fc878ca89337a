"""The Gradio app (`app.py`): served on loopback by `python app.py` and used through headless Chromium, as a person
would, and through gradio's own client for the GeoTIFF paths."""

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageFilter
from rasterio.transform import from_origin
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from helpers import WORDS, free_port, make_processor, tiny_model


REPOSITORY = Path(__file__).resolve().parents[1]
MODEL_SIDE = 64
STARTUP_TIMEOUT = 120
PAGE_TIMEOUT = 60
# Headless Chromium without the background services that would try to reach the network.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1300",
)


def fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # the app serves everything from loopback
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py` on a free loopback port, with a random-weight tiny model; stopped after the module's tests."""
    folder = tmp_path_factory.mktemp("app")
    # Seed 1 gives this example scene a mask over about half the image at threshold 0.5 (a partial mask to look at).
    tiny_model(seed=1, text_config={"vocab_size": len(WORDS)}).save_pretrained(folder / "model")
    make_processor(size=MODEL_SIDE).save_pretrained(folder / "model")
    port = free_port()
    environment = {
        **os.environ,
        "CROBIM_U_MODEL": str(folder / "model"),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(folder / "gradio"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
    }
    log_path = folder / "app.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPOSITORY / "app.py")], cwd=folder, env=environment, stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"app.py exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                fetch(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not serve {url} within {STARTUP_TIMEOUT} s:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser():
    missing = [program for program in ("chromium", "chromedriver") if shutil.which(program) is None]
    if missing:
        message = f"{', '.join(missing)} not found: the browser test needs Debian's chromium and chromium-driver"
        if os.environ.get("CI"):  # .ci/run installs them: there a missing browser is a failure, never a skip
            pytest.fail(message)
        pytest.skip(message + " (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for_toast(wait: WebDriverWait, text: str) -> str:
    """The text of the error toast that contains `text` (gradio shows `gr.Error` messages as toasts)."""
    return wait.until(
        lambda driver: next(
            (toast.text for toast in driver.find_elements(By.CSS_SELECTOR, ".toast-body") if text in toast.text),
            False,
        )
    )


def test_browser_picks_an_example_segments_it_and_shows_the_mask_over_the_image(app_url, browser, tmp_path):
    started = time.perf_counter()
    wait = WebDriverWait(browser, PAGE_TIMEOUT)
    browser.get(app_url)
    segment = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#segment")))

    # Bad input is answered in the page with the app's and the package's own messages.
    segment.click()
    assert "No image: choose an example scene" in wait_for_toast(wait, "No image")
    browser.find_element(By.CSS_SELECTOR, "tr.tr-body").click()  # the first example scene
    expressions = browser.find_element(By.CSS_SELECTOR, "#expressions textarea")
    wait.until(lambda driver: expressions.get_attribute("value"))  # the example's own expression
    expressions.clear()
    expressions.send_keys("   ")
    segment.click()
    wait_for_toast(wait, "Give at least one expression.")

    expressions.clear()
    expressions.send_keys("the red car")
    segment.click()
    overlay_element = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#overlays img")))
    mask_link = wait.until(
        lambda driver: next(
            (link for link in driver.find_elements(By.CSS_SELECTOR, "#downloads a")
             if link.get_attribute("href").endswith("_mask.png")),
            False,
        )
    )
    assert "the red car (score 0." in browser.find_element(By.CSS_SELECTOR, "#overlays").text
    for close in browser.find_elements(By.CSS_SELECTOR, "[class*=toast] [aria-label=Close], button.toast-close"):
        if close.is_displayed():
            close.click()  # the error toasts would cover the result in the screenshot
    wait.until(
        lambda driver: not any(toast.is_displayed() for toast in driver.find_elements(By.CSS_SELECTOR, ".toast-body"))
    )
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "app.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"browser test: screenshot {screenshot}, {time.perf_counter() - started:.1f} s")

    input_link = browser.find_element(By.CSS_SELECTOR, "#image-file a")
    image = np.asarray(Image.open(io.BytesIO(fetch(input_link.get_attribute("href")))).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(fetch(mask_link.get_attribute("href"))))) > 0
    overlay = np.asarray(Image.open(io.BytesIO(fetch(overlay_element.get_attribute("src")))).convert("RGB"))
    height, width = image.shape[:2]
    assert mask.shape == (height, width) and 0 < mask.mean() < 1
    # The overlay is the image with the mask drawn on it, the uncertainty map beside it, the expression above.
    assert overlay.shape[1] == 2 * width
    panel = overlay[-height:, :width]
    changed = (panel != image).any(axis=-1)
    assert changed[mask].mean() > 0.99
    near_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    assert not changed[~near_mask].any()  # untouched away from the mask and its one-pixel outline


def test_geotiff_needs_a_band_choice_and_gives_a_georeferenced_mask(app_url, tmp_path):
    path = tmp_path / "four_bands.tif"
    transform = from_origin(500_000, 4_000_000, 10, 10)
    bands = np.random.default_rng(0).integers(0, 4000, (4, 96, 80)).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", height=96, width=80, count=4, dtype="uint16", crs="EPSG:32633",
                       transform=transform) as raster:
        raster.write(bands)
    client = Client(app_url, verbose=False, download_files=str(tmp_path / "downloads"))

    with pytest.raises(AppError, match="has 4 bands without a red/green/blue colour interpretation; choose the RGB"):
        client.predict(handle_file(path), "the red car", "", 0.5, api_name="/segment")
    with pytest.raises(AppError, match="Bands: expected 1-based band numbers separated by commas, e.g. 4,3,2; got 'x'"):
        client.predict(handle_file(path), "the red car", "x", 0.5, api_name="/segment")

    overlays, figures, downloads = client.predict(
        handle_file(path), "the red car\nthe large building", "3,2,1", 0.5, api_name="/segment"
    )
    assert [figure["expression"] for figure in figures] == ["the red car", "the large building"]
    assert [overlay["caption"] for overlay in overlays] == [
        f"{figure['expression']} (score {figure['score']:.3f})" for figure in figures
    ]
    masks = [Path(file) for file in downloads if file.endswith("_mask.tif")]
    assert len(masks) == 2
    with rasterio.open(masks[0]) as mask:
        assert mask.crs.to_string() == "EPSG:32633" and mask.transform == transform
        assert (mask.height, mask.width) == (96, 80) and set(np.unique(mask.read(1))) <= {0, 1}


def test_without_a_model_the_page_says_how_to_get_one(tmp_path, monkeypatch):
    import gradio

    monkeypatch.chdir(tmp_path)  # no outputs/demo here
    monkeypatch.delenv("CROBIM_U_MODEL", raising=False)
    specification = importlib.util.spec_from_file_location("crobim_u_app", REPOSITORY / "app.py")
    app_module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(app_module)
    page = app_module.build_app()
    components = list(page.blocks.values())
    texts = " ".join(component.value for component in components if isinstance(component, gradio.Markdown))
    assert "No model loaded** from `outputs/demo`: the folder does not exist." in texts
    assert "Train the demo model with `crobim-u demo`" in texts
    (button,) = [component for component in components if isinstance(component, gradio.Button)]
    assert button.interactive is False
