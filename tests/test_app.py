"""The Gradio playground as users start it (`sc-steer app --run A --run B --port P`, a subprocess):
API through gradio_client, concurrent users, and a real headless browser (marked slow); and the UI built in
process."""
import json
import os
import threading
from pathlib import Path

import pytest

from sc_steer import open_model
from sc_steer.interpret import interpret
from helpers import firing_sae, launch_chromium, serve_app
from sc_steer.steer import Intervention, Recipe, generate

def test_the_app_builds_with_the_library_s_modes_and_a_steer_endpoint(tiny_model_dirs, tmp_path):
    """In process, without a server (the tests below start it as users do): the UI builds over a run, its
    mode and position choices are the library's, and its recipe table and snippet round-trip a recipe."""
    from sc_steer.steer import MODES, POSITIONS
    from sc_steer_apps.playground import build, python_snippet, recipe_of, recipe_name
    from sc_steer_apps.serving import Playground

    firing_sae().save(tmp_path / "saes" / "resid_post.1")
    (tmp_path / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    blocks = build([tmp_path])
    radios = [c for c in blocks.blocks.values() if type(c).__name__ == "Radio"]
    assert sorted(tuple(ch[0] for ch in r.choices) for r in radios) == sorted([MODES, POSITIONS])
    assert "steer" in {d.api_name for d in blocks.fns.values()}
    items = [{"site": "resid_post.1", "feature": 3, "mode": "clamp", "coeff": 2.5, "positions": "prompt"}]
    rec = recipe_of(items)
    assert rec.interventions == [Intervention("resid_post.1", 3, "clamp", 2.5, "prompt")]
    assert recipe_name(items) == "resid_post.1-3-clamp2.5" and recipe_name([]) == "empty"
    snippet = python_snippet(rec, Playground(tmp_path), "Once upon", 12, True, 0.7, 5)
    assert "Intervention('resid_post.1', 3, 'clamp', 2.5, 'prompt')" in snippet and str(tmp_path) in snippet
    assert Playground(tmp_path).limits.max_prompt_tokens == 511     # the tiny model has 512 positions
    assert "prompt = 'Once upon'" in snippet and "max_new_tokens=12, do_sample=True, temperature=0.7, seed=5" in snippet


@pytest.fixture(scope="module")
def app(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("apprun")
    sae = firing_sae()
    sae.save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    text = run / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. To be, or not to be. " * 20)
    lm = open_model(str(tiny_model_dirs["llama"]))
    interpret(lm, {"resid_post.1": sae}, str(text), run, ctx=32, top_n=10, min_count=1, neurons=False,
              progress=False)
    run2 = tmp_path_factory.mktemp("apprun2")   # a second run with other SAEs, chosen per request
    other = firing_sae(seed=11)
    other.save(run2 / "saes" / "resid_post.1")
    (run2 / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    with serve_app(["--run", str(run), "--run", str(run2)], cwd=tmp_path_factory.mktemp("appcwd")) as url:
        yield {"url": url, "lm": lm, "saes": {"resid_post.1": sae}, "run": run, "run2": run2,
               "saes2": {"resid_post.1": other}}


def recipe(feature, coeff, mode="add"):
    return Recipe([Intervention("resid_post.1", feature, mode, coeff)])


@pytest.mark.slow
def test_gradio_client_gets_the_library_result(app):
    from gradio_client import Client

    client = Client(app["url"], verbose=False)
    r = recipe(3, 8.0)
    base, steered = client.predict("In the beginning", r.to_json(), 12, False, 1.0, 0, "", api_name="/steer")
    kw = dict(max_new_tokens=12)
    assert base == generate(app["lm"], ["In the beginning"], None, app["saes"], **kw)[0]
    assert steered == generate(app["lm"], ["In the beginning"], r, app["saes"], **kw)[0]
    assert steered != base


@pytest.mark.slow
def test_a_second_run_is_served_with_its_own_saes(app):
    from gradio_client import Client

    client = Client(app["url"], verbose=False)
    r = recipe(3, 8.0)
    got = client.predict("In the beginning", r.to_json(), 10, False, 1.0, 0, str(app["run2"].resolve()),
                         api_name="/steer")[1]
    assert got == generate(app["lm"], ["In the beginning"], r, app["saes2"], max_new_tokens=10)[0]
    with pytest.raises(Exception, match="unknown run"):
        client.predict("In the beginning", r.to_json(), 5, False, 1.0, 0, "/etc", api_name="/steer")


@pytest.mark.slow
def test_four_concurrent_clients_each_get_their_own_result(app):
    from gradio_client import Client

    jobs = [("In the beginning", recipe(3, 8.0)), ("To be, or not", recipe(7, -6.0)),
            ("God created the heaven", recipe(11, 0.0, "remove")), ("the earth", recipe(2, 5.0, "clamp"))]
    expected = [generate(app["lm"], [p], r, app["saes"], max_new_tokens=10)[0] for p, r in jobs]
    results = [None] * 4

    def call(i):
        client = Client(app["url"], verbose=False)
        results[i] = client.predict(jobs[i][0], jobs[i][1].to_json(), 10, False, 1.0, 0, "", api_name="/steer")[1]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == expected


@pytest.mark.slow
def test_bad_recipe_is_a_clear_error(app):
    from gradio_client import Client

    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match="out of range"):
        client.predict("In the beginning", recipe(99, 1.0).to_json(), 5, False, 1.0, 0, "", api_name="/steer")


@pytest.mark.slow
def test_browser_adds_a_feature_and_sees_steered_text(app, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    shot = Path(os.environ.get("SC_STEER_SCREENSHOT_DIR", tmp_path)) / "playground.png"
    errors = []
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app["url"])
        page.fill("#query textarea, #query input", "3")
        page.click("#search")
        page.wait_for_function("document.querySelector('#results').innerText.includes('resid_post.1')")
        page.fill("#feature input", "3")
        page.locator("#feature input").press("Enter")
        page.click("#add")
        page.wait_for_function("document.querySelector('#recipe') && document.querySelector('#recipe').innerText.includes('resid_post.1')")
        page.fill("#prompt textarea", "In the beginning")
        page.click("#generate")
        # the UI's defaults: add, coefficient 10, all positions, 40 new tokens, greedy
        want_base = generate(app["lm"], ["In the beginning"], None, app["saes"], max_new_tokens=40)[0]
        want = generate(app["lm"], ["In the beginning"], recipe(3, 10.0), app["saes"], max_new_tokens=40)[0]
        page.wait_for_function("w => document.querySelector('#steered textarea').value === w", arg=want,
                               timeout=60000)
        base = page.input_value("#baseline textarea")
        steered = page.input_value("#steered textarea")
        assert base == want_base
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert steered and base and steered != base
    assert errors == []


@pytest.mark.slow
def test_a_huge_request_does_not_block_a_normal_one(tiny_model_dirs, tmp_path):
    """Requests are bounded at launch: too many tokens or too long a prompt are refused at once, and a
    long-but-allowed generation stops at the time limit, so a normal request behind it waits little."""
    import time

    from gradio_client import Client

    run = tmp_path / "run"
    firing_sae().save(run / "saes" / "resid_post.1")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    rec = recipe(3, 8.0).to_json()
    limits = ["--max-new-tokens", "480", "--max-prompt-tokens", "64", "--time-limit", "0.5"]
    with serve_app(["--run", str(run), *limits], cwd=tmp_path) as url:
        client = Client(url, verbose=False)
        client.predict("In the", rec, 2, False, 1.0, 0, "", api_name="/steer")   # warm
        for args, message in [(("In the", rec, 100000), "max_new_tokens 100000"),
                              (("word " * 13000, rec, 5), "limit of 512"),
                              (("word " * 80, rec, 5), "limit of 64")]:
            t = time.monotonic()
            with pytest.raises(Exception, match=message):
                client.predict(*args, False, 1.0, 0, "", api_name="/steer")
            assert time.monotonic() - t < 5
        got = {}

        def long_request():
            t = time.monotonic()
            got["long"] = Client(url, verbose=False).predict("In the", rec, 480, False, 1.0, 0, "", api_name="/steer")
            got["long_s"] = time.monotonic() - t

        th = threading.Thread(target=long_request)
        th.start()
        time.sleep(0.3)
        t = time.monotonic()
        base, steered = client.predict("In the beginning", rec, 8, False, 1.0, 0, "", api_name="/steer")
        waited = time.monotonic() - t
        th.join(timeout=60)
    assert steered and base and waited < 5, waited
    assert got["long_s"] < 10 and got["long"][0], got


@pytest.mark.slow
def test_generation_stops_at_its_time_limit_or_when_cancelled(app):
    import time

    from sc_steer.steer import generate

    lm, saes = app["lm"], app["saes"]
    t = time.monotonic()
    short = generate(lm, ["In the beginning"], recipe(3, 8.0), saes, max_new_tokens=400, max_time=0.05)[0]
    assert time.monotonic() - t < 3
    full = generate(lm, ["In the beginning"], recipe(3, 8.0), saes, max_new_tokens=400)[0]
    assert len(lm.tokenizer(short)["input_ids"]) < len(lm.tokenizer(full)["input_ids"])
    stop = threading.Event()
    stop.set()
    assert len(generate(lm, ["In the beginning"], None, saes, max_new_tokens=400, cancel=stop)[0]) < len(full)


@pytest.mark.slow
def test_a_stream_closed_by_its_client_stops_generating(app):
    """A browser that goes away closes the stream: the generation stops and the model lock is freed."""
    import time

    from sc_steer_apps.serving import Limits, Playground

    pg = Playground(app["run"], limits=Limits(max_new_tokens=480, seconds=60))
    r = recipe(3, 8.0)
    t = time.monotonic()
    full = pg.continuation("In the beginning", r, 480, False, 1.0, 0)
    whole = time.monotonic() - t                  # a full generation: seconds on the tiny model
    assert len(pg.lm.tokenizer(full)["input_ids"]) > 400
    stream = pg.stream("In the beginning", r, 480, False, 1.0, 0)
    next(stream)
    assert pg.lock.locked()
    t = time.monotonic()
    stream.close()
    while pg.lock.locked() and time.monotonic() - t < 30:
        time.sleep(0.005)
    freed = time.monotonic() - t
    assert not pg.lock.locked() and freed < min(0.5, whole / 4), (freed, whole)
