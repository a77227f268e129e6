"""End-to-end: the real app on demo models, driven by Playwright in Debian's headless Chromium."""
import os
import urllib.request
from pathlib import Path

import pytest

from merger.files.checkpoint_io import load_checkpoint
from tests.conftest import CHROMIUM, ROOT

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api")
SCREENSHOT = ROOT / "docs" / "merge-tab.png"


@pytest.fixture(scope="module")
def app(browser_app):
    """The app for this module: one app process for every browser test module (conftest's
    ``browser_app``; each start took 9-10 s of imports and demo models)."""
    return browser_app


@pytest.fixture(scope="module")
def page(app, chromium):
    """A fresh page on the shared app and browser for each module."""
    pg = chromium.new_page(viewport={"width": 1400, "height": 1000})
    pg.goto(app["url"])
    pg.wait_for_selector("#merge_gen")
    pg.fill("#prompt textarea", "a cat --w 64 --h 64 --s 3 --d 1")
    yield pg
    pg.close()


def status(pg, sel="#status textarea") -> str:
    return pg.input_value(sel)


def click_and_wait(pg, button: str, words=("merged", "generated", "saved", "loaded", "Error", "Stopped"),
                   sel="#status textarea", timeout=180_000) -> str:
    before = status(pg, sel)
    pg.click(button)
    pg.wait_for_function(
        "([sel, before, words]) => { const v = document.querySelector(sel).value;"
        " return v !== before && words.some(w => v.includes(w)); }",
        arg=[sel, before, list(words)], timeout=timeout)
    return status(pg, sel)


def set_number(pg, elem: str, value) -> None:
    box = pg.locator(f"{elem} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def pick(pg, elem: str, value: str) -> None:
    pg.click(f"{elem} input")
    pg.locator("ul[role=listbox] li", has_text=value).first.click()


def gallery_image(pg) -> bytes:
    pg.wait_for_selector("#gallery img")
    src = pg.locator("#gallery img").first.get_attribute("src")
    return urllib.request.urlopen(src if src.startswith("http") else pg.url.rstrip("/") + src).read()


def test_merge_and_gen_shows_an_image_and_alpha_changes_it(page):
    set_number(page, "#alpha", 0.2)
    msg = click_and_wait(page, "#merge_gen", ("generated", "Error"))
    assert "merged #" in msg and "generated 1 image" in msg, msg
    first = gallery_image(page)
    assert first[:4] == b"\x89PNG"
    assert "Merge ID" in page.input_value("#pnginfo textarea")
    set_number(page, "#alpha", 0.9)
    click_and_wait(page, "#merge_gen", ("generated", "Error"))
    page.wait_for_timeout(500)
    assert gallery_image(page) != first
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)   # shown in the README


def test_mbw_preset_fills_the_sliders(page):
    page.click("#mbw_accordion")
    pick(page, "#mbw_preset", "GRAD_V")
    page.wait_for_function("document.querySelector('#mbw_alpha textarea').value.startsWith('0,1,0.916')")
    assert page.input_value("#mbw_IN00 input[type=number]") == "1"
    assert page.input_value("#mbw_M00 input[type=number]") == "0"
    assert page.input_value("#mbw_OUT11 input[type=number]") == "1"


def test_history_row_and_load_settings(page, app):
    set_number(page, "#alpha", 0.3)
    click_and_wait(page, "#merge", ("merged", "Error"))
    set_number(page, "#alpha", 0.75)
    msg = click_and_wait(page, "#load_settings", ("loaded settings", "Error"))
    assert "loaded settings of merge #" in msg
    page.wait_for_function("document.querySelector('#alpha input[type=number]').value === '0.3'")
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("document.querySelector('#history_table').innerText.split('weight_sum').length > 3",
                           timeout=30_000)     # three merges so far, newest first
    page.get_by_role("tab", name="Merge").click()


def test_save_current_merge_writes_a_file_that_loads(page, app):
    page.click("text=Save options")
    page.fill("#custom_name textarea", "browser-save")
    msg = click_and_wait(page, "#save_current", ("saved", "Error"))
    assert "saved" in msg, msg
    path = app["dirs"].ckpt / "browser-save.safetensors"
    assert path.exists() and len(load_checkpoint(path).tensors) > 900


def test_stop_interrupts_generation(page):
    page.fill("#prompt textarea", "a cat --w 64 --h 64 --s 150 --d 1")   # several seconds of work
    before = status(page)
    page.click("#gen")
    page.wait_for_timeout(1500)
    page.click("#stop")
    page.wait_for_function("([b]) => { const v = document.querySelector('#status textarea').value;"
                           " return v !== b && v.length > 0; }", arg=[before], timeout=120_000)
    assert status(page).startswith("Stopped: generation stopped by user"), status(page)
    page.fill("#prompt textarea", "a cat --w 64 --h 64 --s 3 --d 1")


def test_sd1_plus_sdxl_is_a_clear_error_and_the_next_merge_works(page):
    pick(page, "#model_b", "demo-sdxl-tiny.safetensors")
    msg = click_and_wait(page, "#merge", ("merged", "Error"))
    assert msg.startswith("Error: cannot merge different architectures") and "SDXL" in msg, msg
    pick(page, "#model_b", "demo-sd1-tiny-C.safetensors")
    msg = click_and_wait(page, "#merge_gen", ("generated", "Error"))
    assert "merged #" in msg and "generated" in msg, msg


def test_gallery_download_keeps_png_info(page, tmp_path):
    click_and_wait(page, "#gen", ("generated", "Error"))
    data = gallery_image(page)
    (tmp_path / "g.png").write_bytes(data)
    from merger.pipeline.pnginfo import read_png_info
    info = read_png_info(tmp_path / "g.png")
    assert "Steps: 3" in info["parameters"] and "sdmw_recipe" in info


def test_elements_and_analysis_tabs(page):
    page.get_by_role("tab", name="Elements").click()
    pick(page, "#elements_model", "demo-sd1-tiny-A.safetensors")
    page.fill("#elements_filter textarea", "time_embed")
    page.click("#elements_show")
    page.wait_for_function("document.querySelector('#elements_table').innerText.includes('time_embed.2.weight')")
    page.get_by_role("tab", name="Analysis").click()
    page.locator("#analysis_go").wait_for(state="visible")
    page.wait_for_timeout(500)
    msg = click_and_wait(page, "#analysis_go", ("blocks", "Error"), sel="#analysis_status textarea")
    assert msg == "cosine (mean per block): 26 blocks", msg
    page.wait_for_function("document.querySelector('#analysis_table').innerText.includes('IN00')")
    page.get_by_role("tab", name="Merge").click()


def fill_axis(pg, name: str, kind: str, values: str) -> None:
    pick(pg, f"#xyz_{name}_type", kind)
    pg.fill(f"#xyz_{name}_values textarea", values)


def test_xyz_2x2_plot_and_a_reservation(page, app):
    page.get_by_role("tab", name="Merge").click()
    pick(page, "#model_b", "demo-sd1-tiny-B.safetensors")
    page.fill("#prompt textarea", "a cat --w 64 --h 64 --s 2 --d 1")
    page.click("#xyz_accordion")
    fill_axis(page, "X", "alpha", "0.2,0.8")
    fill_axis(page, "Y", "seed", "1,2")
    msg = click_and_wait(page, "#xyz_run", ("plot finished", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("plot finished: 4/4 cells"), msg
    page.wait_for_selector("#xyz_gallery img")
    grids = list((app["data"] / "outputs" / "xyz").glob("*/grid-00.png"))
    assert grids, "no grid saved"
    # a reservation: "|" makes two plots; Start runs them; the table shows both finished
    fill_axis(page, "X", "alpha", "0.3|0.6")
    fill_axis(page, "Y", "none", "")
    msg = click_and_wait(page, "#xyz_reserve", ("reserved", "Error"), sel="#xyz_status textarea")
    assert msg == "reserved plot(s) #1, #2", msg
    page.get_by_role("tab", name="Reservations").click()
    msg = click_and_wait(page, "#res_start", ("reservation(s) run", "Error"), sel="#res_status textarea")
    assert msg == "2 reservation(s) run", msg
    page.wait_for_function("document.querySelector('#res_table').innerText.split('finished').length === 3")
    page.get_by_role("tab", name="Merge").click()


def test_lora_tab_list_merge_and_gen(page, app):
    page.get_by_role("tab", name="LoRA").click()
    page.locator("#lora_refresh").wait_for(state="visible")
    page.wait_for_timeout(300)
    click_and_wait(page, "#lora_refresh", ("LoRAs",), sel="#lora_status textarea")
    page.wait_for_function("document.querySelector('#lora_table').innerText.includes('demo-sd1-tiny-lora')")
    assert "LoRA" in page.inner_text("#lora_table")
    page.fill("#lora_spec textarea", "demo-sd1-tiny-lora:0.8:OUTALL")
    msg = click_and_wait(page, "#lora_merge_gen", ("generated", "Error"), sel="#lora_status textarea")
    assert "merged #" in msg and "demo-sd1-tiny-lora" in msg and "generated 1 image" in msg, msg
    page.get_by_role("tab", name="Merge").click()


def test_history_row_select_load_and_save(page, app):
    page.get_by_role("tab", name="History").click()
    page.locator("#history_refresh").wait_for(state="visible")
    page.wait_for_timeout(300)
    page.click("#history_refresh")
    page.wait_for_function("document.querySelector('#history_table').innerText.includes('weight_sum')")
    cells = page.locator("#history_table").get_by_text("weight_sum", exact=True)
    cells.nth(next(i for i in range(cells.count()) if cells.nth(i).is_visible())).click()   # newest row
    page.wait_for_function("document.querySelector('#history_id textarea').value !== ''")
    row_id = page.input_value("#history_id textarea")
    msg = click_and_wait(page, "#history_save", ("saved", "Error"), sel="#history_status textarea")
    assert msg.startswith("saved ") and msg.endswith(".safetensors"), msg
    page.click("#history_load")
    page.get_by_role("tab", name="Merge").click()
    page.wait_for_function("([id]) => document.querySelector('#status textarea').value"
                           ".startsWith('loaded settings of merge #' + id)", arg=[row_id])
