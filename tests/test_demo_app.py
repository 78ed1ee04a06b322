"""The demo as people use it: a real server (`python demo/app.py`), its API through gradio_client, and
the page in a real headless Chromium driven by Playwright. One server serves the module; it is stopped
by its process id at the end.

DIFFACCEL_DEMO_SCREENSHOT=path saves the page after a run (docs/demo.png is made this way)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image
from playwright.sync_api import expect, sync_playwright

import diffaccel
from diffaccel import accelerate_pipeline, remove_acceleration
from diffaccel.config import config_dict

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
STEPS = 6
PROMPT = "a large red circle at the top left and a small blue square at the bottom right"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("demo") / "server.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--port", str(port), "--workers", "2",
                             "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the demo exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not start: " + Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _config(*methods, **overrides) -> str:
    return json.dumps(config_dict(list(methods), **overrides))


def _run(client: Client, config: str, seed: int = 0, steps: int = STEPS, prompt: str = PROMPT,
         model: str = "dit") -> tuple:
    return client.predict(model, config, prompt, "", seed, steps, 256, 4.5, 0, api_name="/run")


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_api_outputs_match_accelerate_pipeline_called_directly(server):
    client = Client(server, verbose=False)
    status, base, acc, stats_md, stats, heatmap, code, config_file = _run(client, _config("toca", "todo"), seed=4)
    assert status.startswith("Done: toca, todo"), status
    assert "Speed-up" in stats_md and "PSNR" in stats_md and "SSIM" in stats_md
    assert stats["methods"] == ["toca", "todo"] and stats["speedup"] > 0 and 0 < stats["ssim"] < 1
    assert json.loads(Path(config_file).read_text()) == json.loads(_config("toca", "todo"))
    assert Image.open(heatmap).size[0] > 300 and "accelerate_pipeline(pipe, [ToCaConfig(), ToDoConfig()])" in code
    pipe = diffaccel.load_reference_pipeline("dit")
    outs = {}
    for label, methods in (("baseline", None), ("accelerated", ["toca", "todo"])):
        if methods:
            accelerate_pipeline(pipe, methods)
        image = pipe(PROMPT, num_inference_steps=STEPS, height=256, width=256, guidance_scale=4.5,
                     generator=torch.Generator().manual_seed(4), output_type="np", clean_caption=False).images[0]
        remove_acceleration(pipe) if methods else None
        outs[label] = (np.clip(image, 0, 1) * 255).round().astype(np.int16)
    # another process (thread pools may differ): the same image up to a rare rounding step
    for label, path in (("baseline", base), ("accelerated", acc)):
        diff = np.abs(_pixels(path) - outs[label])
        assert diff.max() <= 2 and diff.mean() < 0.05, (label, diff.max(), diff.mean())


def test_concurrent_runs_give_what_they_give_one_at_a_time(server):
    """Two users (two sessions) run different methods at once: each gets the output the same call gives
    alone, so no method state or cache leaks between requests."""
    calls = [(_config("tome", ratio=0.5), 1), (_config("fora", interval=2), 2)]
    clients = [Client(server, verbose=False) for _ in calls]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda a: _run(a[0], a[1][0], seed=a[1][1], prompt="concurrency"),
                                 zip(clients, calls)))
    alone = [_run(clients[0], cfg, seed=seed, prompt="concurrency") for cfg, seed in calls]
    for t, a in zip(together, alone):
        assert t[0].startswith("Done") and a[0].startswith("Done"), (t[0], a[0])
        assert t[4]["accelerated_sha256"] == a[4]["accelerated_sha256"]
        assert t[4]["baseline_sha256"] == a[4]["baseline_sha256"] and a[4]["baseline_cached"]
    assert together[0][4]["accelerated_sha256"] != together[1][4]["accelerated_sha256"]
    assert all(t[4]["alongside"] == 1 for t in together), "the two runs did not overlap"
    assert all(a[4]["alongside"] == 0 for a in alone) and "shared the machine" in together[0][3]


def test_bad_input_is_a_message_and_the_app_stays_usable(server):
    client = Client(server, verbose=False)
    status, base, *_, stats, _, _, _ = _run(client, "{not json")
    assert status.startswith("Error: the acceleration is not valid JSON") and base is None and "error" in stats
    bad_policy = json.dumps({"format": "diffaccel.acceleration", "version": 1,
                             "methods": [{"method": "fora", "policy": {"rules": [{"params": {"ratio": 0.5}}]}}]})
    assert _run(client, bad_policy)[0].startswith("Error: policy sets ['ratio'], which fora does not read")
    out_of_range = json.dumps({"format": "diffaccel.acceleration", "version": 1,
                               "methods": [{"method": "toca", "interval": 0}]})
    assert _run(client, out_of_range)[0] == "Error: ToCaConfig.interval must be in [1, 1000], got 0"
    assert _run(client, _config("toca", "tome"))[0].startswith("Error: toca and tome would both reduce the tokens")
    model, message, *_ = client.predict("/no/such/folder", api_name="/load")
    assert message.startswith("Error: no such folder") and "unchanged" in message
    assert model == {"__type__": "update"}  # the pipeline choice is left as it is
    assert _run(client, _config("fora"), steps=3)[0].startswith("Done: fora")
    # the other embedded pipeline, loaded on first use
    status, *_, stats, _, code, _ = _run(client, _config("tome", ratio=0.5), steps=3, model="unet")
    assert status == "Done: tome on reference U-Net (SD-style, trained here)" and not stats["identical"]
    assert "load_reference_pipeline('unet')" in code


def test_a_run_can_be_cancelled_and_the_next_one_is_correct(server):
    client = Client(server, verbose=False)
    reference = _run(Client(server, verbose=False), _config("toca"), seed=9, prompt="cancel")[4]
    job = client.submit("dit", _config("toca"), "cancel", "", 9, 100, 256, 4.5, 0, api_name="/run")
    deadline = time.monotonic() + 60
    while job.status().code.name not in ("PROCESSING", "ITERATING", "PROGRESS"):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.1)
    time.sleep(1.0)
    assert client.predict(api_name="/cancel") == "cancelling…"
    status = job.result(timeout=60)[0]
    assert status.startswith("Cancelled (cancelled at step") and "the next run starts clean" in status
    again = _run(client, _config("toca"), seed=9, prompt="cancel")[4]
    assert again["accelerated_sha256"] == reference["accelerated_sha256"]


def test_the_page_in_a_real_browser(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(server)
            page.wait_for_selector("#run")
            # the generated controls: every registered method, and the selected one's knobs
            labels = page.locator("#methods label").all_inner_texts()
            assert sorted(t.strip() for t in labels) == diffaccel.available_methods()
            expect(page.locator("#opt-toca-interval")).to_be_visible()
            page.locator("#methods label", has_text="toca").click()
            page.locator("#methods label", has_text="fora").click()
            expect(page.locator("#opt-fora-interval")).to_be_visible()
            expect(page.locator("#opt-toca-interval")).to_be_hidden()
            steps = page.locator("#steps input[type=number]")
            steps.fill(str(STEPS))
            steps.press("Enter")
            page.click("#run")
            expect(page.locator("#stats")).to_contain_text("Speed-up", timeout=120_000)
            expect(page.locator("#stats")).to_contain_text("PSNR")
            expect(page.locator("#stats")).to_contain_text("SSIM")
            expect(page.locator("#status")).to_contain_text("Done: fora")
            for image in ("#baseline img", "#accelerated img", "#heatmap img"):
                expect(page.locator(image)).to_be_visible()
                assert page.locator(image).get_attribute("src")
            expect(page.locator("#code")).to_contain_text("FORAConfig()")
            if os.environ.get("DIFFACCEL_DEMO_SCREENSHOT"):
                page.screenshot(path=os.environ["DIFFACCEL_DEMO_SCREENSHOT"], full_page=True)
            # an invalid policy in the advanced panel: its message inline, then in the run's status
            page.get_by_text("Advanced: the acceleration as JSON").click()
            page.locator("#use-json input").check()
            editor = page.locator("#config-json .cm-content")
            editor.click()
            page.keyboard.press("Control+A")
            page.keyboard.insert_text('{"format": "diffaccel.acceleration", "version": 1, "methods": '
                                      '[{"method": "fora", "policy": {"rules": [{"params": {"ratio": 0.5}}]}}]}')
            expect(page.locator("#config-msg")).to_contain_text("Error: policy sets ['ratio']", timeout=20_000)
            page.click("#run")
            expect(page.locator("#status")).to_contain_text("Error: policy sets ['ratio']", timeout=30_000)
            # still usable: back to the controls, run again
            page.locator("#use-json input").uncheck()
            page.click("#run")
            expect(page.locator("#status")).to_contain_text("Done: fora", timeout=120_000)
        finally:
            browser.close()
