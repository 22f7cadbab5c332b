"""cascade serve (cascade/serve.py): every task through the Studio, the page in a real headless
Chromium (Debian's chromium and chromium-driver, driven by Selenium; .ci/run installs them): type
a prompt, generate, a video of the right length appears; an empty prompt is a message and the
next request still works; and a bounded load test through Gradio's client API."""
import gc
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_conditions import cascade_dir, image  # noqa: F401  (module fixture)
from tests.test_pipeline import full, stages  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py
PROMPT = "a red circle moving left on a blue background"
FAST = {"base": {"steps": 2}, "interp": {"steps": 1}, "sr": {"steps": 1}}
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
SHOT = Path(__file__).resolve().parent / "data" / "serve_shot.png"


@pytest.fixture(scope="module")
def studio(cascade_dir, tmp_path_factory):  # noqa: F811
    from cascade.serve import Studio
    return Studio(cascade_dir, FAST, out_dir=tmp_path_factory.mktemp("serve"))


def test_the_guidance_slider_starts_at_the_default(studio):
    """The base's guidance given to the Studio, else the base's own config (what sampling uses)."""
    from cascade.serve import Studio, build_app

    def slider(st):
        return [b.value for b in build_app(st).blocks.values() if getattr(b, "label", None) == "Base guidance"]
    assert slider(studio) == [studio.pipe.base.cfg.diffusion.guidance]          # FAST sets none
    assert slider(Studio(studio.stages, {"base": {"guidance": 3.0}}, out_dir=studio.out)) == [3.0]


def test_the_autoguidance_slider_shows_where_the_base_has_a_guide(studio, tmp_path):
    """Hidden for a base with no guide/ (where autoguidance other than 1 is a one-line error),
    shown at the config's weight where it has one, and generating with it works."""
    from cascade.serve import Studio, build_app

    def slider(st):
        return [(b.value, b.visible) for b in build_app(st).blocks.values()
                if getattr(b, "label", None) == "Base autoguidance (1: off)"]
    assert slider(studio) == [(1.0, False)]
    with pytest.raises(ValueError, match="needs a guide model"):
        studio.generate("Text to video", PROMPT, base_autoguidance=2.0)
    root = tmp_path / "ag"
    root.mkdir()
    for name in ("vae", "interp", "sr"):
        (root / name).symlink_to(studio.stages / name)
    shutil.copytree(studio.stages / "base", root / "base")
    shutil.copytree(studio.stages / "base", root / "base" / "guide")
    guided = Studio(root, FAST, out_dir=tmp_path / "out")
    assert slider(guided) == [(1.0, True)]
    out = guided.generate("Text to video", PROMPT, base_autoguidance=2.0)
    assert Path(out["video"]).is_file()


def test_every_task_through_the_studio(studio, tmp_path):
    from PIL import Image

    from cascade.video_io import read_video, write_mp4
    png = tmp_path / "img.png"
    Image.fromarray(((image(0, (3, 20, 28)).permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(png)
    clip = write_mp4(image(1, (3, 9, 32, 32)), tmp_path / "clip.mp4", fps=16)
    other = write_mp4(image(2, (3, 5, 32, 32)), tmp_path / "other.mp4", fps=16)
    cases = {"Text to video": {}, "Image to video": {"image": str(png), "last_image": str(png)},
             "Extend": {"video": str(clip), "new_frames": 4}, "Connect": {"video": str(clip), "video_b": str(other)},
             "Loop": {}, "Edit": {"video": str(clip), "strength": 0.5}}
    for task, kw in cases.items():
        out = studio.generate(task, PROMPT, progress=False, stage_outputs=True, **kw)
        frames, fps = read_video(out["video"])
        assert frames.shape[0] == out["frames"] and fps == pytest.approx(16), task
        assert Path(out["sheet"]).is_file() and len(out["stages"]) == 4 and "| base |" in out["table"]
    for bad, msg in (({"task": "Text to video", "prompt": " "}, "empty prompt"),
                     ({"task": "Image to video", "prompt": PROMPT}, "give an image"),
                     ({"task": "Text to video", "prompt": PROMPT, "height": 50}, "--height"),
                     ({"task": "Image to video", "prompt": PROMPT, "image": str(clip)}, "cannot read image")):
        with pytest.raises(ValueError, match=msg):
            studio.generate(progress=False, **bad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cascade_dir):  # noqa: F811
    from cascade.serve import serve
    port = free_port()
    app, studio = serve(cascade_dir, FAST, port=port, block=False)
    yield f"http://127.0.0.1:{port}", studio
    app.close()


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    o = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,1400"):
        o.add_argument(a)
    o.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=o)


def wait_for(fn, timeout=180, what=""):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    end = time.time() + timeout
    while time.time() < end:
        try:
            got = fn()
        except (StaleElementReferenceException, NoSuchElementException):   # Gradio re-renders
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_in_a_real_browser(server, tmp_path):
    from selenium.webdriver.common.by import By

    from cascade.video_io import read_video
    url, studio = server
    d = chrome()
    try:
        d.get(url)
        box = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the page")[0]
        box.clear()
        box.send_keys(PROMPT)
        d.find_element(By.CSS_SELECTOR, "#go-text").click()
        src = wait_for(lambda: (d.find_elements(By.CSS_SELECTOR, "#result video") or [None])[0] and
                       d.find_element(By.CSS_SELECTOR, "#result video").get_attribute("src"), what="the video")
        duration = wait_for(lambda: d.execute_script(
            "const v = document.querySelector('#result video'); return v && v.duration > 0 && v.duration"),
            60, "its duration")
        frames, fps = read_video(sorted(studio.out.glob("job*/video.mp4"))[-1])
        assert frames.shape[0] == 7 and duration == pytest.approx(7 / fps, abs=0.07)
        d.save_screenshot(str(tmp_path / "serve.png"))
        box.clear()
        box.send_keys("   ")                                              # a bad input
        d.find_element(By.CSS_SELECTOR, "#go-text").click()
        toast = wait_for(lambda: [e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")
                                  if "empty prompt" in e.text], 60, "the error message")
        assert toast
        box.clear()
        box.send_keys("a green square moving up on a white background")    # the server still serves
        d.find_element(By.CSS_SELECTOR, "#go-text").click()
        wait_for(lambda: d.find_element(By.CSS_SELECTOR, "#result video").get_attribute("src") != src,
                 what="the second video")
    finally:
        d.quit()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def test_load_all_requests_complete_in_order_and_memory_returns(server):
    """N concurrent requests through the app's client API: all complete, one at a time in the
    order they were queued, none lost; the process's memory after is within 64 MiB of before
    (the first job's warm-up done before measuring)."""
    from gradio_client import Client

    from cascade.heap import malloc_trim
    url, studio = server
    client = Client(url, verbose=False)
    args = lambda p: [p, 0, 0, 32, 32, 0, 2.0, "", 0, 0, False, "", False, 1.0]   # noqa: E731
    client.predict(*args(PROMPT), api_name="/generate_text_to_video")      # warm-up
    gc.collect()
    malloc_trim()
    before, start = rss_mib(), studio.jobs
    jobs = []
    with ThreadPoolExecutor(4) as pool:
        for i in range(6):
            jobs.append(pool.submit(client.predict, *args(f"{PROMPT} {i}"), api_name="/generate_text_to_video"))
            time.sleep(0.2)                                                  # queued in this order
        outs = [j.result(timeout=600) for j in jobs]
    assert studio.jobs == start + 6                                         # none lost
    order = [int(o[2].split(":")[0].removeprefix("job ")) for o in outs]      # "job N: prompt ..."
    assert order == sorted(order) == list(range(start + 1, start + 7))
    gc.collect()
    malloc_trim()
    assert rss_mib() < before + 64, (before, rss_mib())


if __name__ == "__main__":                 # python -m tests.test_serve SHOT.png [STAGES]: the docs picture
    import sys as _sys
    from cascade.serve import serve
    port = free_port()
    app, studio = serve(_sys.argv[2] if len(_sys.argv) > 2 else "weights/tiny",
                        {"base": {"steps": 50, "guidance": 2.5, "sampler": "euler_ancestral"},
                         "interp": {"steps": 8, "guidance": 1.0}, "sr": {"steps": 3, "guidance": 1.0}},
                        port=port, block=False)
    CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
    from selenium.webdriver.common.by import By
    d = chrome()
    d.get(f"http://127.0.0.1:{port}")
    box = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60)[0]
    d.find_element(By.CSS_SELECTOR, "#go-text").click()
    wait_for(lambda: d.execute_script(
        "const v = document.querySelector('#result video'); return v && v.duration > 0"), 300)
    time.sleep(1.5)
    d.save_screenshot(_sys.argv[1])
    d.quit()
    app.close()
    print(f"wrote {_sys.argv[1]}")


def test_long_videos_plan_or_chain_from_the_settings(studio):
    """The long-video setting reaches the base: plan and chain make the same length of video by
    other windows (so other keyframes); a mode that does not exist is a one-line error."""
    plan, chain = (studio.generate("Text to video", PROMPT, frames=25, base_long=m) for m in ("plan", "chain"))
    assert plan["frames"] == chain["frames"] == 25
    from cascade.video_io import read_video
    read = lambda out: read_video(out["video"])[0]                      # noqa: E731
    assert (read(plan).astype(float) - read(chain).astype(float)).std() > 1
    with pytest.raises(ValueError, match="long: 'both' is not one of plan, chain"):
        studio.generate("Text to video", PROMPT, frames=25, base_long="both")
    # the windows' steps reach the base too: other steps after the first window, another video
    fewer = studio.generate("Text to video", PROMPT, frames=25, base_long="plan", base_window_steps=1)
    assert (read(fewer).astype(float) - read(plan).astype(float)).std() > 1
    with pytest.raises(ValueError, match="window_steps: must be"):
        studio.generate("Text to video", PROMPT, frames=25, base_window_steps=-1)
