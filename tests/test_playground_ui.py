"""The playground as a new user meets it: `sc-steer app` started as a subprocess over a run with two
sites, driven in headless Chromium. Each test is one of the ways the UI used to let a user believe
something that was not so (issue 28's numbered items)."""
import json
import re
from pathlib import Path

import pytest

from helpers import firing_sae, launch_chromium, serve_app
from sc_steer import open_model
from sc_steer.cli import main
from sc_steer.steer import Intervention, Recipe, generate

pytestmark = pytest.mark.slow
TEXT = "In the beginning God created the heaven and the earth.\nTo be, or not to be.\nExeunt all.\n" * 20


@pytest.fixture(scope="module")
def served(tiny_model_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("uirun")
    saes = {"resid_post.1": firing_sae(seed=5), "resid_post.2": firing_sae(seed=6)}
    for s, sae in saes.items():
        sae.save(run / "saes" / s)
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dirs["llama"])}))
    (run / "t.txt").write_text(TEXT)
    lm = open_model(str(tiny_model_dirs["llama"]))
    # as users make them: the interpretation (records, browser) and the graph (layer 1 -> 2), through the CLI
    assert main(["interpret", "--run", str(run), "--data", str(run / "t.txt"), "--max-tokens", "1500",
                 "--min-count", "1", "--no-neurons"]) == 0
    assert main(["graph", "--run", str(run), "--prompts", str(run / "t.txt"), "--out", str(run / "graph"),
                 "--ctx", "32", "--max-prompts", "8", "--sources", "top:6", "--layers", "1"]) == 0
    cwd = tmp_path_factory.mktemp("uicwd")
    with serve_app(["--run", str(run)], cwd=cwd) as url:
        log = next(cwd.glob("app-*.log"))
        yield {"url": url, "lm": lm, "saes": saes, "run": run, "log": log}


@pytest.fixture
def page(served):
    playwright = pytest.importorskip("playwright.sync_api")
    errors = []
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        pg = browser.new_page(viewport={"width": 1500, "height": 1200})
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(served["url"])
        pg.wait_for_selector("#generate")
        yield pg
        browser.close()
    assert errors == []


def toast(page, text: str) -> None:
    page.get_by_text(re.compile(re.escape(text))).first.wait_for(timeout=20000)


def recipe_json(page) -> dict:
    value = page.input_value("#recipe_json textarea")
    return json.loads(value) if value.strip() else {"interventions": []}


def inspect(page, site: str, feature) -> None:
    page.locator("#site input").fill(site)
    page.locator("#site input").press("Enter")
    page.fill("#feature input", str(feature))
    page.click("#inspect")


def set_coeff(page, value) -> None:
    page.fill("#coeff input", str(value))
    page.locator("#coeff input").press("Enter")


def test_generate_with_an_empty_recipe_warns_and_runs_nothing(page, served):
    """Item 1: a feature chosen and a coefficient set, but never added: no silent identical pair."""
    inspect(page, "resid_post.1", 3)
    set_coeff(page, 12)
    page.click("#generate")
    toast(page, "the recipe is empty")
    assert page.input_value("#steered textarea") == "" and page.input_value("#baseline textarea") == ""
    assert "refused: the recipe is empty" in served["log"].read_text()


def test_a_result_row_selects_its_own_site_and_results_clear_when_the_scope_changes(page):
    """Item 2: the row clicked is what is inspected and added, whatever the site dropdown says."""
    page.fill("#query textarea, #query input", "")
    page.click("#search")
    page.wait_for_function("document.querySelectorAll('#results [role=row]').length > 1")
    row = page.locator("#results [role=row]").nth(1)          # the first data row (Gradio draws divs)
    row_site = row.locator("[role=gridcell]").nth(0).inner_text().strip()
    fid = row.locator("[role=gridcell]").nth(1).inner_text().strip()
    other = "resid_post.1" if row_site == "resid_post.2" else "resid_post.2"
    page.locator("#site input").fill(other)          # the dropdown says one site ...
    page.locator("#site input").press("Enter")
    row.locator("[role=gridcell]").nth(2).click()     # ... the row clicked another
    page.wait_for_function(f"document.querySelector('#details').innerText.includes('{row_site} #{fid}')")
    page.click("#add")
    page.wait_for_function(f"document.querySelector('#recipe_json textarea').value.includes('{row_site}')")
    assert recipe_json(page)["interventions"][0]["site"] == row_site
    assert recipe_json(page)["interventions"][0]["feature"] == int(fid)
    page.locator("#scope input").fill(other)
    page.locator("#scope input").press("Enter")
    page.wait_for_function("document.querySelectorAll('#results [role=row]').length <= 1")


def test_the_controls_edit_the_row_and_bad_numbers_are_refused(page, served):
    """Item 3: after Add, moving the coefficient changes the recipe; 1000000 is refused, never clamped.
    Item 5: an id out of range and a fractional id are refused with one clear line each."""
    inspect(page, "resid_post.1", 3)
    set_coeff(page, 12)
    page.click("#add")
    page.wait_for_function("document.querySelector('#recipe_json textarea').value.includes('12')")
    set_coeff(page, 30)
    page.wait_for_function("document.querySelector('#recipe_json textarea').value.includes('30')")
    assert [it["coeff"] for it in recipe_json(page)["interventions"]] == [30.0]
    set_coeff(page, 1000000)
    toast(page, "coefficient 1000000")
    assert [it["coeff"] for it in recipe_json(page)["interventions"]] == [30.0]
    inspect(page, "resid_post.1", 5000)
    toast(page, "feature id 5000 is out of range for resid_post.1 (0-39)")
    inspect(page, "resid_post.1", 3.5)
    toast(page, "expected a whole number")
    log = served["log"].read_text()
    assert "refused: feature id 5000 is out of range" in log and "Traceback" not in log


def test_the_run_is_the_recipe_shown_with_heatmaps_scores_and_a_snippet_that_reproduces_it(page, served):
    """Items 4, 6, 7: what runs is the recipe on screen; heatmaps on the prompt and both continuations
    in absolute units with a legend and hover values; scores; a snippet with this prompt and length;
    a download named after the recipe."""
    inspect(page, "resid_post.1", 3)
    set_coeff(page, 10)
    page.click("#add")
    page.wait_for_function("document.querySelector('#recipe_json textarea').value.includes('resid_post.1')")
    page.fill("#prompt textarea", "In the beginning")
    page.click("#generate")
    want = generate(served["lm"], ["In the beginning"], Recipe([Intervention("resid_post.1", 3, "add", 10.0)]),
                    served["saes"], max_new_tokens=40)[0]
    page.wait_for_function("w => document.querySelector('#steered textarea').value === w", arg=want, timeout=60000)
    page.wait_for_selector("#heat .heat[data-feature='resid_post.1:3']", timeout=60000)
    heat = page.inner_html("#heat")
    assert "<i>prompt</i>" in heat and "<i>baseline</i>" in heat and "<i>steered</i>" in heat
    assert "its maximum on the interpretation data" in heat or "the largest here" in heat
    assert re.search(r"title=\"[\d.]+ \(\d+% of [\d.]+\)\"", heat)
    page.wait_for_function("document.querySelector('#scores').innerText.includes('KL to baseline')")
    snippet = page.inner_text("#snippet")
    assert "'In the beginning'" in snippet and "max_new_tokens=40" in snippet
    assert "Intervention('resid_post.1', 3, 'add', 10.0, 'all')" in snippet
    with page.expect_download() as dl:
        page.click("#download")
    assert dl.value.suggested_filename == "recipe-resid_post.1-3-add10.json"
    assert json.loads(Path(dl.value.path()).read_text())["interventions"][0]["feature"] == 3


def test_a_pasted_recipe_loads_and_a_bad_one_is_one_line(page, served):
    """Item 7: recipes can be pasted; bad fields are refused with a clear message."""
    good = Recipe([Intervention("resid_post.2", 4, "clamp", 2.5, "prompt")]).to_json()
    page.fill("#recipe_json textarea", good)
    page.click("#load")
    page.wait_for_function("document.querySelector('#recipe').innerText.includes('clamp')")
    assert recipe_json(page)["interventions"][0] == {"site": "resid_post.2", "feature": 4, "mode": "clamp",
                                                     "coeff": 2.5, "positions": "prompt", "vector": None,
                                                     "include_bos": False}
    page.fill("#recipe_json textarea", '{"interventions": [{"site": "resid_post.1", "feature": "exit"}]}')
    page.click("#load")
    toast(page, "feature id 'exit'")
    assert "Traceback" not in served["log"].read_text()


def test_search_covers_every_site_ranked_sorted_with_a_full_dashboard_and_clickable_neighbours(page, served):
    """Item 8: a context-text match is found at both sites; sorting by density orders the rows; the
    dashboard has the top-token table, logit lens and histogram; graph neighbours are labelled, and a
    click on one inspects it; a feature outside the graph says so."""
    page.fill("#query textarea, #query input", "heaven")
    page.click("#search")
    page.wait_for_function("document.querySelectorAll('#results [role=row]').length > 1")
    text = page.inner_text("#results")
    assert "resid_post.1" in text and "resid_post.2" in text
    page.locator("#sort input").fill("density")
    page.locator("#sort input").press("Enter")
    page.wait_for_timeout(1500)
    rows = page.locator("#results [role=row]")
    dens = [float(rows.nth(i).locator("[role=gridcell]").nth(2).inner_text()) for i in range(1, min(6, rows.count()))]
    assert dens == sorted(dens, reverse=True)
    graph = json.loads((served["run"] / "graph" / "graph.json").read_text())
    src = next(e["source"] for e in graph["links"])
    layer, feat = src.lstrip("L").split("/F")
    inspect(page, f"resid_post.{layer}", feat)
    page.wait_for_function("document.querySelector('#details').innerText.includes('top token')")
    details = page.inner_text("#details")
    assert "Logit lens" in details and "Activation histogram" in details and "Ablation-graph neighbours" in details
    page.wait_for_function("document.querySelectorAll('#neighbours [role=row]').length > 1")
    nb = page.locator("#neighbours [role=row]").nth(1)
    nb_site, nb_id = (nb.locator("[role=gridcell]").nth(i).inner_text().strip() for i in (0, 1))
    nb.locator("[role=gridcell]").nth(2).click()
    page.wait_for_function(f"document.querySelector('#details').innerText.includes('{nb_site} #{nb_id}')")
    in_graph = {n["id"] for n in graph["nodes"]}
    outside = next(f for f in range(40) if f"L1/F{f}" not in in_graph)
    inspect(page, "resid_post.1", outside)
    page.wait_for_function("document.querySelector('#details').innerText.includes(\"not in this run's graph\")")


def test_static_browser_pages_links_and_keeps_line_breaks_and_graph_view_reads_well(page, served):
    """Item 9: every unit reachable (paging), the count honest, a deep link opens its unit and clicking
    sets the link, contexts keep their line breaks; the graph view has layer headers and rounded numbers."""
    index = (served["run"] / "browser" / "index.html").as_uri()
    page.goto(index)
    page.wait_for_selector("#list .item")
    assert "showing 40 of 40 matching (40 units)" in page.inner_text("#count")
    page.goto(index + "#resid_post.2/7")
    page.wait_for_function("document.querySelector('#main h2') && document.querySelector('#main h2').innerText.startsWith('#7:')")
    assert page.input_value("#set") == "sae/resid_post.2"
    page.locator("#list .item").nth(3).click()
    assert re.search(r"#resid_post\.2/\d+$", page.evaluate("location.hash"))
    ctx = page.inner_text("#main .ctx")
    assert "↵" in page.inner_html("#main") and "\n" in ctx
    page.goto((served["run"] / "graph" / "graph.html").as_uri())
    page.wait_for_selector("text.layer")
    assert page.locator("text.layer").first.text_content().startswith("layer ")
    page.locator(".node").first.click()
    info = page.inner_text("#info")
    assert "weight" in info and not re.search(r"\d\.\d{7,}", info)
