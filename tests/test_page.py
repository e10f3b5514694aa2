"""The page at ``GET /`` in a real headless browser (Debian's chromium through chromium-driver, driven by selenium):
the key prompt, the top label of each uploaded sample equal to ``/classify``'s, an error shown as the API's message,
the cosine-similarity matrix of embeddings; and ``GET /`` for clients that are not browsers.

Set ``DEIT_UI_SCREENSHOT=docs/ui.png`` to refresh the README's screenshot from this test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.profiles import DEMO_KEY, DEMO_KEYED
from tests.serving import DEMO_MODEL, REPO, ServerProcess, SharedServers, free_port, serve_in_process

KEY = DEMO_KEY
SAMPLES = [DEMO_MODEL / "samples" / name for name in ("3_a.png", "7_a.png", "9_a.png")]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(servers: SharedServers) -> ServerProcess:
    """The demo model behind one API key; the page only reads, so the server is shared (``DEMO_KEYED``)."""
    return servers.get(DEMO_MODEL.parent, DEMO_KEYED)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (scripts/test does where it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def _api_message(response: httpx.Response) -> str:
    message: str = response.json()["error"]["message"]
    return message


def test_the_page_classifies_like_the_api_and_shows_its_errors(
    server: ServerProcess, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert isinstance(browser, WebDriver)
    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(server.url + "/")
    # Keys are required: the page asks for one, with the API's own message.
    wait.until(ec.visibility_of_element_located((By.ID, "key")))
    unauthorized = _api_message(httpx.get(f"{server.url}/v1/models"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), unauthorized))
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY + Keys.TAB)  # leaving the field loads the models with the key
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in SAMPLES))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .result")) == len(SAMPLES))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), " ms"))
    shown = [
        c.find_element(By.CSS_SELECTOR, ".pred .label").text for c in browser.find_elements(By.CSS_SELECTOR, ".result")
    ]
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES]
    answer = httpx.post(f"{server.url}/classify", files=files, headers={"X-API-Key": KEY}, timeout=30).json()
    assert shown == [r["predictions"][0]["label"] for r in answer["results"]]
    assert "deit-tiny-digits v1" in browser.find_element(By.ID, "status").text
    model_info = browser.find_element(By.ID, "model-info").text
    assert "runtime torch " in model_info, model_info  # the runtime by name and precision, not an object
    screenshot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(screenshot))
    if os.environ.get("DEIT_UI_SCREENSHOT"):
        shutil.copyfile(screenshot, REPO / os.environ["DEIT_UI_SCREENSHOT"])

    # A file that is not an image: the page shows the API's message for it, word for word.
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    refused = httpx.post(
        f"{server.url}/classify",
        files={"file": ("notes.txt", b"not an image", "text/plain")},
        headers={"X-API-Key": KEY},
        timeout=30,
    )
    assert refused.status_code in (415, 422)
    browser.find_element(By.ID, "files").send_keys(str(text_file))
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert browser.find_element(By.ID, "error").text == _api_message(refused)

    # Embeddings: each image's vector length and the cosine-similarity matrix (1 on the diagonal).
    Select(browser.find_element(By.ID, "task")).select_by_value("embed")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in SAMPLES[:2]))
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "table.sim td")) == 4)
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.sim td")]
    assert cells[0] == cells[3] == "1.000"
    assert "vector of 64 floats" in browser.find_element(By.ID, "results").text


def test_clients_that_are_not_browsers_get_json_at_the_root(server: ServerProcess) -> None:
    described = httpx.get(f"{server.url}/", timeout=10)
    assert described.headers["content-type"].startswith("application/json")
    assert described.json()["api_key_required"] is True
    page = httpx.get(f"{server.url}/", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/page.js">' in page.text
    assert httpx.get(f"{server.url}/ui/page.js", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/ui/..%2Fpage.py", timeout=10).status_code == 404
    # POST / is still the Hugging Face API.
    image = SAMPLES[0].read_bytes()
    hf = httpx.post(f"{server.url}/", content=image, headers={"X-API-Key": KEY, "Content-Type": "image/png"})
    assert hf.status_code == 200
    assert {"label", "score"} <= set(hf.json()[0])


def test_no_ui_leaves_the_root_to_json() -> None:
    settings = Settings.model_validate(
        {"model_store": DEMO_MODEL.parent, "port": free_port(), "ui": False, "warmup": False}
    )
    with serve_in_process(settings) as server:
        root = httpx.get(f"{server.url}/", headers={"Accept": "text/html"}, timeout=10)
        assert root.headers["content-type"].startswith("application/json")
        assert root.json()["ui"] is False
        assert httpx.get(f"{server.url}/ui/page.js", timeout=10).status_code == 404
