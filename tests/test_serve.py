"""The playground (md4 serve): request checks, the event stream over HTTP, 20 concurrent requests,
and the page in a real headless Chromium (skipped without Debian's chromium + chromium-driver and selenium)."""

import json
import shutil
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest

import md4
from md4 import serve
from md4.cli import main
from md4.errors import UserError


@pytest.fixture(scope="module")
def server(trained_run):
    srv = serve.make_server(md4.load(trained_run), "127.0.0.1", 0, max_steps=64)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, path="") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{path}"


def events(srv, **params) -> list[tuple[str, dict]]:
    """The (event, data) pairs of one /sample stream."""
    body = urllib.request.urlopen(url(srv, "sample?" + urlencode(params)), timeout=60).read().decode()
    out = []
    for block in body.strip().split("\n\n"):
        kind, data = block.split("\n")
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_bound_to_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"


def test_infill_streams_states_and_keeps_known_characters(server):
    text = "the m_n said that ___ was"
    ev = events(server, text=text, mode="infill", steps=8, seed=1)
    kinds = [k for k, _ in ev]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"state"} and len(kinds) >= 9
    states = [d["text"] for _, d in ev]
    assert states[0] == text  # the first state: all blanks still masked
    final = ev[-1][1]["text"]
    assert "_" not in final and len(final) == len(text)
    assert all(f == c for f, c in zip(final, text) if c != "_")
    assert [d["step"] for _, d in ev[:-1]][-1] == 8
    # each state keeps what the last one revealed: the number of blanks never grows
    blanks = [s.count("_") for s in states]
    assert blanks == sorted(blanks, reverse=True) and blanks[0] == 4


def test_prompt_continues_to_the_model_length(server):
    final = events(server, text="The man", mode="prompt", steps=4, sampler="confidence", temperature=0.5, top_p=0.9)[-1]
    assert final[0] == "done" and final[1]["text"].startswith("the man") and len(final[1]["text"]) == 32


@pytest.mark.parametrize("params, message", [
    ({"text": "Hi! the c_t"}, "The text has characters this model does not know ('!'); it writes only a-z and space, "
                              "with _ for a blank."),
    ({"text": "a_" * 20}, "The text has 40 characters; this model writes at most 32."),
    ({"text": "the c_t", "steps": "0"}, "Steps must lie between 1 and 64, got 0."),
    ({"text": "the cat"}, "Mark the characters to fill with _ (or choose prompt to continue the text)."),
    ({"text": ""}, "Type a text: with _ for the characters to fill, or a prompt to continue."),
    ({"text": "the c_t", "temperature": "hot"}, "Temperature must be a number, got 'hot'."),
    ({"text": "the c_t", "sampler": "magic"}, "Unknown sampler 'magic'; choose one of ancestral, cached, mean, "
                                              "jump, confidence, remdm."),
    ({"text": "a" * 40, "mode": "prompt"}, "The text has 40 characters; this model writes at most 32."),
])
def test_bad_input_gives_one_message(server, params, message):
    assert events(server, **params) == [("problem", {"message": message})]


def test_twenty_concurrent_requests_complete(server):
    def one(i):
        return events(server, text="the _a_ said", steps=6, seed=i)[-1]

    with ThreadPoolExecutor(20) as pool:
        finals = list(pool.map(one, range(20)))
    assert all(k == "done" and "_" not in d["text"] for k, d in finals)
    assert len({d["text"] for _, d in finals}) > 1  # different seeds, different fills
    assert json.loads(urllib.request.urlopen(url(server, "info"), timeout=10).read())["kind"] == "text"  # still up


def test_serve_command_errors(trained_run, capsys):
    assert main(["serve", str(trained_run), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "md4: error: --port must lie in 0..65535, got 70000."
    with pytest.raises(UserError, match="at least 1"):
        serve.serve(str(trained_run), max_steps=0)


# ----------------------------------------------------------------- the page in a real browser
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,760"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def generate(driver, text: str, steps: int, mode: str = "infill") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    field = driver.find_element(By.ID, "steps")
    field.clear()
    field.send_keys(str(steps))
    driver.find_element(By.ID, "run").click()


def test_page_in_a_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(url(server))
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert browser.title == "md4 playground"
    assert "md4 model, text, sequences of 32 tokens" in browser.find_element(By.ID, "about").text
    samplers = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sampler option")]
    assert samplers == ["ancestral", "cached", "mean", "jump", "confidence"]

    text = "the m_n said that ___ was not"
    generate(browser, text, steps=12)
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")
    final = browser.find_element(By.ID, "output").text
    assert len(final) == len(text) and "_" not in final
    assert all(f == c for f, c in zip(final, text) if c != "_")  # the known characters are kept
    states = [li.get_attribute("textContent") for li in browser.find_elements(By.CSS_SELECTOR, "#states li")]
    assert len(states) >= 3 and states[0] == text and states[-1] == final  # intermediate states appeared
    assert all(a != b for a, b in zip(states, states[1:]))  # one line per state that changed something
    assert any(0 < s.count("_") < 4 for s in states)  # a state part way: some blanks filled, not all
    assert browser.find_element(By.ID, "message").text == ""
    assert browser.find_element(By.ID, "status").text.startswith("done in")
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for bad, message in (("Hi! the c_t", "The text has characters this model does not know ('!')"),
                         ("a_" * 20, "The text has 40 characters; this model writes at most 32.")):
        generate(browser, bad, steps=4)
        wait_for(browser, lambda d: d.find_element(By.ID, "message").text != "")
        shown = browser.find_element(By.ID, "message").text
        assert shown.startswith(message) and "\n" not in shown  # one clear message
        assert browser.find_element(By.ID, "run").is_enabled()
    generate(browser, "the c_t", steps=0)
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text != "")
    assert browser.find_element(By.ID, "message").text == "Steps must lie between 1 and 64, got 0."



def test_image_model_streams_the_grid(tmp_path, monkeypatch):
    """A class-conditional image model: PNG grids after every step, label and guidance checked."""
    import base64
    import struct

    from test_image_cli import train_images

    srv = serve.make_server(md4.load(train_images(tmp_path, monkeypatch)), "127.0.0.1", 0, max_steps=64)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert json.loads(urllib.request.urlopen(url(srv, "info"), timeout=10).read())["num_classes"] == 10
        ev = events(srv, num=4, label=3, guidance=1.5, steps=4)
        assert [k for k, _ in ev][-1] == "done" and len(ev) >= 3
        pngs = [base64.b64decode(d["image"].removeprefix("data:image/png;base64,")) for _, d in ev]
        # 4 images of 7x7 pixels, 8x enlarged, 2 per row with 2-pixel gaps: 118 x 118
        assert all(p[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", p[16:24]) == (118, 118) for p in pngs)
        assert pngs[0] != pngs[-1]  # all masked (red) at first, filled in at the end
        assert events(srv, num=4, label=10) == [("problem", {"message": "The class label must lie between 0 and 9, got 10."})]
        assert events(srv, num=40) == [("problem", {"message": "The number of images must lie between 1 and 16, got 40."})]
    finally:
        srv.shutdown()
        srv.server_close()
