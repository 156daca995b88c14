"""The live cluster page in a real browser (headless Chromium driven by Playwright) over a tiny
three-replica ARES cluster: it renders every replica and follows the traffic, migrations
included. Skipped only when Chromium is absent outside CI (.ci/run installs it)."""

import os
import shutil
import threading

import httpx
import numpy as np
import pytest
from frontend_support import ECFG, idle, metric, wait_until, with_tokenizer

from ares_jax.cluster import ClusterConfig, ServingLoop
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.frontend import HTTPServerThread, LoopBackend

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)



@pytest.fixture(scope="module")
def served(tiny_model):
    # Static round-robin dispatch puts every long request on replica 0; ARES rescheduling then
    # moves some away (the set-up of the migration tests). The three replicas share one
    # device, so they share compiled steps with test_frontend.py (same engine config).
    model = with_tokenizer(tiny_model)
    loop = ServingLoop(PrefillEngine(model, ECFG), [DecodeEngine(model, ECFG) for _ in range(3)],
                       model.tokenizer, ClusterConfig(policy="ares", dispatch_policy="static",
                                                      reschedule_every=2))
    backend = LoopBackend(loop, model_name="tiny-cluster")
    with HTTPServerThread(backend) as server:
        yield server, backend
    backend.close()
    loop.check_no_leaks()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must have chromium (.ci/run installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(served[0].url + "/")
        yield page
        browser.close()
        assert not errors, errors


def _traffic(url: str) -> None:
    """12 streamed requests, one after another reaching the decode replicas (each is
    dispatched before the next is sent, so static dispatch is round-robin in this order):
    requests 0, 3, 6, 9 are long and all land on replica 0."""
    threads = []
    for i in range(12):
        dispatched = threading.Event()
        body = {"model": "tiny-cluster", "stream": True, "ignore_eos": True, "temperature": 0,
                "prompt": np.random.default_rng(10 + i).integers(4, 500, size=20).tolist(),
                "max_tokens": 100 if i % 3 == 0 else 8}

        def run(body=body, dispatched=dispatched):
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    dispatched.set()

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        assert dispatched.wait(120)
    for t in threads:
        t.join()


def test_page_renders_replicas_and_follows_traffic(served, page, tmp_path):
    server, backend = served
    # Three decode replicas and the prefill replica (id 3).
    page.wait_for_function("document.querySelectorAll('#replicas .replica').length === 4")
    assert sorted(page.locator(".replica .title b").all_text_contents()) == \
        ["replica 0", "replica 1", "replica 2", "replica 3"]
    assert page.locator("#policy").text_content() == "ares"
    assert page.locator("#requests-finished").text_content() == "0"
    page.screenshot(path=str(tmp_path / "before.png"))

    traffic = threading.Thread(target=_traffic, args=(server.url,))
    traffic.start()
    # while the long requests decode, the page shows replica 0 holding KV pages
    page.wait_for_function(
        "+document.querySelector('.replica[data-replica=\"0\"] .kv-used').textContent > 0",
        timeout=60_000)
    page.screenshot(path=str(tmp_path / "during.png"), full_page=True)
    traffic.join()
    wait_until(lambda: idle(backend.cluster_state()), 10.0)
    page.wait_for_function(
        "document.getElementById('requests-finished').textContent === '12'", timeout=30_000)

    state = backend.cluster_state()
    committed = state["counters"]["migrations_committed"]
    assert committed >= 1, state["counters"]  # ARES moved long requests off replica 0
    page.wait_for_function(
        f"document.getElementById('migrations-committed').textContent === '{committed}' && "
        f"document.querySelectorAll('#migrations tbody tr').length === "
        f"{len(state['migrations'])}", timeout=10_000)
    rows = page.locator("#migrations tbody tr").all_inner_texts()
    assert any("0 → " in row and "committed" in row for row in rows), rows
    # every replica is back to zero pages used on the page, as in the cluster
    page.wait_for_function(
        "[...document.querySelectorAll('.kv-used')].every(e => e.textContent === '0')",
        timeout=10_000)
    shot = tmp_path / "after.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # the page's canvases drew something (not blank)
    drawn = page.evaluate("""() => [...document.querySelectorAll('canvas')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let ink = 0; for (let i = 3; i < d.length; i += 4) ink += d[i] > 0; return ink; })""")
    assert len(drawn) == 8 and min(drawn) > 100, drawn  # two charts per replica
    # and the Prometheus counters agree with the cluster state
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "ares:migrations_total", outcome="committed") == committed
    assert metric(text, "ares:migration_kv_bytes_total") == state["counters"]["migration_bytes"]
    assert metric(text, "ares:migration_downtime_seconds_count") >= 1
