"""The playground page, in real headless Chromium (Debian's, driven by Playwright) against a real relay
and node: its security headers, its messages, speech that reaches the audio graph, names as text."""

from __future__ import annotations

import shutil
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import API_KEY, Node, Relay

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="no Chromium here (Debian's chromium package; .ci/run installs it where it can)",
)
XSS = '<img src=x onerror="window.__xss=1">'
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "playground.png"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    from local_node.testing.tiny_model import write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("playground")
    write_tiny_checkpoint(tmp / "base", "base")
    write_tiny_checkpoint(tmp / "design", "voice_design")
    models = {
        "tone": {
            "engine": "synthetic",
            "aliases": ["tts-1"],
            "max_batch": 2,
            "voices": {"alloy": {"speaker": "tone"}, XSS: {"speaker": "tone"}},
        },
        "base": {"source": str(tmp / "base"), "max_new_frames": 8},  # speaks the voices recorded on the page
        "design": {"source": str(tmp / "design"), "max_new_frames": 8},  # voices described in words
    }
    with Relay(tmp) as relay, Node(tmp, relay, models, voices_dir=str(tmp / "voices")) as node:
        relay.wait_for_models({"tts-1", "base", "design"}, node=node, timeout=300)
        yield relay


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    microphone = tmp_path_factory.mktemp("microphone") / "voice.wav"  # what Chromium's fake microphone hears
    t = np.arange(48000 * 3) / 48000
    with wave.open(str(microphone), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes((0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * 32767).astype("<i2").tobytes())
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += ["--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    flags.append(f"--use-file-for-fake-audio-capture={microphone}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        yield browser
        browser.close()


def open_page(browser, relay):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(f"{relay.url}/")
    return page, problems


def use_key(page, key: str = API_KEY) -> None:
    page.fill("#key", key)
    page.click("#connect")


def ready_to_speak(page, model: str, voice: str = "alloy") -> None:
    """With the key in, once the pickers are filled: ``model`` and ``voice`` chosen."""
    use_key(page)
    page.wait_for_function("() => document.getElementById('voice').options.length > 0")
    page.select_option("#model", model)
    page.select_option("#voice", voice)


def test_the_page_loads_with_its_policy_and_no_console_errors(relay, browser):
    response = httpx.get(f"{relay.url}/playground")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "connect-src 'self'" in policy
    assert response.headers["x-content-type-options"] == "nosniff" and response.headers["referrer-policy"] == "no-referrer"
    assert API_KEY not in response.text and "<script>" not in response.text  # no inline script, no secret
    page, problems = open_page(browser, relay)
    page.wait_for_function("() => document.getElementById('status').textContent.includes('ready')")
    assert page.text_content("#status") == "Relay ready: 1 node connected."
    use_key(page)
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    assert {"tone", "tts-1"} <= set(page.eval_on_selector_all("#model option", "options => options.map(o => o.value)"))
    page.wait_for_function("() => document.getElementById('models').textContent.includes('Models')")
    models = set(page.text_content("#models").removeprefix("Models: ").split("; "))
    assert models == {"tone (also tts-1): built-in voices", "base: speaks your own voices", "design: voices described in words"}
    assert problems == []
    assert API_KEY not in page.url


def test_a_wrong_key_shows_its_message(relay, browser):
    page, _ = open_page(browser, relay)
    use_key(page, "sk-wrong-0123456789abcdef")
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('refused')")
    assert "Incorrect API key" in page.text_content("#key-message")


def test_speak_plays_pcm_as_it_arrives(relay, browser):
    page, problems = open_page(browser, relay)
    ready_to_speak(page, "tone")
    page.select_option("#format", "pcm")
    page.fill("#text", "Hello there.")
    page.click("#speak")
    page.wait_for_function("() => document.getElementById('speak-result').textContent.includes('First audio')", timeout=30000)
    assert int(page.get_attribute("#speak-result", "data-samples")) == 12 * 1920  # a frame per character, all scheduled
    assert "real-time factor" in page.text_content("#speak-result")
    assert page.get_attribute("#download", "download") == "speech.pcm"
    assert problems == []
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_a_voice_named_like_markup_is_shown_as_text(relay, browser):
    page, _ = open_page(browser, relay)
    use_key(page)
    page.wait_for_function("() => document.getElementById('voice-list').children.length > 0")
    assert any(XSS in item for item in page.eval_on_selector_all("#voice-list li", "items => items.map(i => i.textContent)"))
    assert page.eval_on_selector_all("#voice-list img, #voice img", "found => found.length") == 0
    assert page.evaluate("window.__xss") is None


def test_speak_plays_mp3_as_it_arrives(relay, browser):
    page, problems = open_page(browser, relay)
    ready_to_speak(page, "tone")
    page.select_option("#format", "mp3")
    page.fill("#text", "A longer sentence to hear.")
    page.click("#speak")
    page.wait_for_function("() => document.getElementById('player').currentTime > 0.2", timeout=30000)  # the audio plays
    page.wait_for_function("() => document.getElementById('speak-result').textContent.includes('First audio')", timeout=30000)
    assert problems == []


def test_live_text_plays_while_it_is_still_being_fed(relay, browser):
    page, problems = open_page(browser, relay)
    ready_to_speak(page, "tone")
    page.fill("#live-text", "One two three four five six seven eight nine ten eleven twelve.")
    page.fill("#live-pace", "4")
    page.click("#live-play")
    page.wait_for_function("() => document.getElementById('live-result').dataset.lastWord", timeout=30000)
    result = page.eval_on_selector("#live-result", "r => ({...r.dataset})")
    assert float(result["firstAudio"]) < float(result["lastWord"])  # heard before the text was all there
    page.wait_for_function("() => document.getElementById('live-result').textContent.includes('Done')", timeout=60000)
    assert int(page.eval_on_selector("#live-result", "r => r.dataset.samples")) > 0
    assert problems == []


def test_a_voice_recorded_here_is_saved_spoken_and_deleted(relay, browser):
    page, problems = open_page(browser, relay)
    use_key(page)
    page.wait_for_function("() => document.getElementById('voice').options.length > 0")
    for control in ("#record-sample", "#record-consent"):
        page.click(control)  # Chromium's fake microphone
        time.sleep(2)
        page.click(control)
        page.wait_for_function(f"() => document.querySelector('{control}').textContent.includes('again')")
    page.fill("#new-voice-name", "Recorded here")
    page.click("#save-voice")
    page.wait_for_function("() => document.getElementById('voice-result').dataset.voice", timeout=60000)
    voice = page.eval_on_selector("#voice-result", "r => r.dataset.voice")
    assert page.input_value("#voice") == voice and page.input_value("#model") == "base"
    page.select_option("#format", "pcm")
    page.click("#speak")
    page.wait_for_function("() => document.getElementById('speak-result').textContent.includes('First audio')", timeout=60000)
    assert int(page.get_attribute("#speak-result", "data-samples")) > 0
    page.click("#voice-list li:has-text('Recorded here') >> text=Delete")
    page.wait_for_function("() => !document.getElementById('voice-list').textContent.includes('Recorded here')", timeout=30000)
    assert httpx.get(f"{relay.url}/v1/audio/voices/{voice}", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404
    assert problems == []


def test_a_voice_described_in_words_is_spoken_by_a_voice_design_model(relay, browser):
    page, problems = open_page(browser, relay)
    use_key(page)
    page.wait_for_function("() => document.getElementById('models').textContent.includes('design')")
    page.select_option("#model", "design")
    assert page.text_content("#instructions-label") == "Describe the voice"
    page.fill("#instructions", "A warm, low voice, speaking slowly.")
    page.select_option("#format", "pcm")
    page.click("#speak")
    page.wait_for_function("() => document.getElementById('speak-result').textContent.includes('First audio')", timeout=60000)
    assert int(page.get_attribute("#speak-result", "data-samples")) == 8 * 1920
    assert problems == []
