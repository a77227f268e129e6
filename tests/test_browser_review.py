"""The recall and review loop in the browser (issue 11): load any merge back, read every grid,
recall a cell, manage the reservation queue, the LoRA tab's defaults. Real app, real Chromium."""
import json
from pathlib import Path

from merger.engine.calcmodes import calcmode_names, get_calcmode
from merger.files.checkpoint_io import read_safetensors_header
from merger.pipeline.pnginfo import read_png_info
from merger.recipe import Recipe
from mergehistory import MergeHistory
from tests.conftest import ROOT
from tests.test_browser import app, click_and_wait, fill_axis, page, pick  # noqa: F401 (fixtures)
from ui import forms

A, B, C = "demo-sd1-tiny-A.safetensors", "demo-sd1-tiny-B.safetensors", "demo-sd1-tiny-C.safetensors"
XL = "demo-sdxl-tiny.safetensors"
DOCS = ROOT / "docs"


def _recipes() -> list[Recipe]:
    """One merge per calcmode, in varied states: SD1 and SDXL, MBW, LoRAs, elemental, adjust."""
    out = [Recipe(A, B, mode="weight_sum", calcmode="normal", alpha=0.25)]
    for i, name in enumerate(n for n in calcmode_names() if n != "normal"):
        cm = get_calcmode(name)
        mode = cm.modes[-1] if i % 2 else cm.modes[0]
        if name == "self":
            out.append(Recipe(XL, mode=mode, calcmode=name, alpha=0.7, mbw_alpha=[round(k / 19, 3) for k in range(20)]))
            continue
        r = Recipe(A, B, C if mode in ("add_difference", "triple_sum", "sum_twice") else "", mode=mode,
                   calcmode=name, alpha=round(0.1 + i / 20, 2), beta=round(0.6 - i / 30, 2))
        if i % 3 == 0:
            r.mbw_alpha = [round(k / 25, 2) for k in range(26)]
        if i == 1:
            r.loras = "demo-sd1-tiny-lora:0.5"
        if i == 2:
            r.elemental = "IN01:in_layers:0.3"
        if i == 4:
            r.adjust = [0.1, 0, 0, 0, 0, 0, 0, 0]
        out.append(r)
    return out


def _circuit(n: int) -> list[int]:
    """A walk through every ordered pair (i, j), i != j, of n states (Hierholzer)."""
    left = {i: [j for j in range(n) if j != i] for i in range(n)}
    stack, walk = [0], []
    while stack:
        v = stack[-1]
        if left[v]:
            stack.append(left[v].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]


def _open_xyz(pg) -> None:
    pg.get_by_role("tab", name="Merge").click()
    if not pg.is_visible("#xyz_X_values"):
        pg.click("#xyz_accordion")
    pg.wait_for_selector("#xyz_X_values")


def _value(pg, sel: str) -> str:
    return pg.evaluate(f"document.querySelector({sel!r}).value")


def _load(pg, r: Recipe, rid: int) -> None:
    """Load the settings of merge ``rid`` (recipe ``r``) and check every widget it sets."""
    pg.fill("#load_id textarea", str(rid))
    msg = click_and_wait(pg, "#load_settings", ("loaded settings", "Error"))
    assert msg.startswith(f"loaded settings of merge #{rid}:"), msg
    pg.wait_for_function("([c]) => document.querySelector('#calcmode input').value === c", arg=[r.calcmode])
    assert _value(pg, "#alpha input") == f"{r.alpha:g}"
    assert pg.is_visible("#beta") == r.uses_beta()
    pg.wait_for_function("([xl]) => { const e = document.querySelector('#mbw_IN09');"
                         " return xl ? (!e || e.offsetParent === null) : (e && e.offsetParent !== null); }",
                         arg=[r.model_a == XL])
    if r.mbw_alpha:
        assert _value(pg, "#mbw_alpha textarea") == ",".join(f"{v:g}" for v in r.mbw_alpha)
    # a slider's value follows (sent without its visibility when the architecture stays the same)
    arch = "sdxl" if r.model_a == XL else "sd1"
    want = (forms.text_to_sliders(",".join(f"{v:g}" for v in r.mbw_alpha), arch) if r.mbw_alpha
            else [0.5] * len(forms.SLIDER_BLOCKS))[forms.SLIDER_BLOCKS.index("IN03")]
    pg.wait_for_function("([w]) => Math.abs(parseFloat(document.querySelector('#mbw_IN03 input[type=number]')"
                         ".value) - w) < 1e-9", arg=[want], timeout=5000)


def test_load_settings_of_every_calcmode_from_every_other_state(page, app):
    """Every ordered pair of states, walked as one circuit on one page. Also: the page keeps no
    Gradio run history (``launch(run_history=False)``): Gradio 6 otherwise stores the inputs and
    outputs of each of the last 100 events in the browser's localStorage and reads and rewrites
    that whole list three times per event, so with this tab's ~110 outputs every click got slower
    as the page aged (a load answered in 0.4 s at first and 1.5 s after 80; now 0.5-0.6 s
    throughout), and every prompt stayed in the browser besides the app's own history."""
    recipes = _recipes()
    assert len(recipes) == len(calcmode_names()) >= 10
    hist = MergeHistory(app["data"] / "mergehistory.csv")
    ids = [hist.append(r, source="test") for r in recipes]
    walk = _circuit(len(recipes))
    assert len(walk) == len(recipes) * (len(recipes) - 1) + 1
    page.get_by_role("tab", name="Merge").click()
    page.click("#mbw_accordion")
    for k in walk:
        _load(page, recipes[k], ids[k])
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('gradio:run-history')).length") == 0
    log = (app["data"].parent / "app.log").read_text()
    assert "not in the list of choices" not in log and "Traceback" not in log
    msg = click_and_wait(page, "#merge", ("merged", "Error"))        # the tab still works
    assert msg.startswith("merged #") and "x 0.25" in msg, msg


def test_alpha_is_never_clamped_or_guessed(page):
    page.get_by_role("tab", name="Merge").click()
    pick(page, "#model_b", B)
    box = page.locator("#alpha input")
    box.fill("")
    box.press_sequentially("abc")           # a number box takes no letters: it stays empty
    msg = click_and_wait(page, "#merge", ("merged", "Error"))
    assert msg == "Error: alpha must be a number, got None", msg
    box.fill("5")
    box.press("Enter")
    msg = click_and_wait(page, "#merge", ("merged", "Error"))
    assert "A x -4.0 + demo-sd1-tiny-B x 5.0 " in msg, msg          # merged at 5, not clamped to 2
    box.fill("0.5")
    box.press("Enter")


def test_model_c_can_be_cleared_and_full_names_are_shown(page):
    pick(page, "#model_c", C)
    page.wait_for_function("([c]) => document.querySelector('#model_names').innerText.includes(c)", arg=[C])
    pick(page, "#model_c", "(none)")
    assert _value(page, "#model_c input") == "(none)"
    names = page.inner_text("#model_names")
    assert A in names and B in names and C not in names


def test_axis_boxes_take_several_lines(page):
    _open_xyz(page)
    pick(page, "#xyz_X_type", "mbw")
    box = page.locator("#xyz_X_values textarea")
    box.fill("")
    box.press_sequentially("GRAD_V")
    box.press("Enter")
    box.press_sequentially("GRAD_A")
    assert box.input_value() == "GRAD_V\nGRAD_A"
    page.fill("#prompt textarea", "a cat --w 64 --h 64 --s 2 --d 1")
    fill_axis(page, "Y", "none", "")
    msg = click_and_wait(page, "#xyz_run", ("plot finished", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("plot finished: 2/2 cells"), msg


def test_an_axis_that_cannot_change_the_plot_is_refused(page):
    _open_xyz(page)
    fill_axis(page, "X", "beta", "0.1,0.9")
    msg = click_and_wait(page, "#xyz_run", ("plot finished", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("Error: X axis (beta) cannot change the result: weight_sum with calcmode normal does "
                          "not use beta"), msg


def test_the_whole_grid_is_visible_and_zooms_and_a_cell_can_be_recalled(page, app):
    _open_xyz(page)
    fill_axis(page, "X", "alpha", "0.2,0.5,0.8")
    opts = " --w 64 --h 64 --s 2 --d 1"
    fill_axis(page, "Y", "prompt", f"a watercolor painting of a cat sitting on a red sofa{opts}\na photo of a dog{opts}")
    msg = click_and_wait(page, "#xyz_run", ("plot finished", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("plot finished: 6/6 cells"), msg
    page.wait_for_selector("#xyz_gallery img")
    page.wait_for_function("document.querySelector('#xyz_gallery img').complete")
    fits = page.evaluate("""() => {
        const img = document.querySelector('#xyz_gallery img'), frame = document.querySelector('#xyz_gallery .grid-wrap');
        const i = img.getBoundingClientRect(), f = frame.getBoundingClientRect();
        const scale = Math.min(i.width / img.naturalWidth, i.height / img.naturalHeight);
        return [i.top >= f.top - 1 && i.bottom <= f.bottom + 1, getComputedStyle(img).objectFit,
                img.naturalHeight * scale <= f.height];
    }""")
    assert fits == [True, "contain", True], fits
    page.locator("#xyz_gallery").screenshot(path=str(DOCS / "xyz-grid.png"))
    page.click("#xyz_gallery .thumbnail-item")
    page.wait_for_selector("#xyz_gallery .preview", timeout=10_000)           # click-to-zoom
    page.keyboard.press("Escape")
    # the cells gallery: captions name each cell; clicking one loads its settings
    page.wait_for_function("document.querySelector('#xyz_cells').innerText.includes('alpha 0.8')")
    page.locator("#xyz_cells .thumbnail-item").nth(2).click()
    page.wait_for_function("document.querySelector('#xyz_cell_id textarea').value !== ''")
    cell_id = page.input_value("#xyz_cell_id textarea")
    page.wait_for_function("([id]) => document.querySelector('#status textarea').value"
                           ".startsWith('loaded settings of merge #' + id)", arg=[cell_id])
    page.wait_for_function("document.querySelector('#alpha input').value === '0.8'")
    msg = click_and_wait(page, "#xyz_cell_save", ("saved", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("saved ") and msg.endswith(".safetensors"), msg
    saved = Path(msg[len("saved "):])
    header, _ = read_safetensors_header(saved)
    assert json.loads(header["__metadata__"]["sdmw_recipe"])["alpha"] == 0.8


def test_dice_cells_show_their_rolls_and_carry_the_recipe(page, app):
    _open_xyz(page)
    fill_axis(page, "X", "random", "2")
    fill_axis(page, "Y", "none", "")
    msg = click_and_wait(page, "#xyz_run", ("plot finished", "Error"), sel="#xyz_status textarea")
    assert msg.startswith("plot finished: 2/2 cells"), msg
    page.wait_for_function("document.querySelector('#xyz_cells').innerText.includes('roll 2 α')")
    caption = page.inner_text("#xyz_cells")
    folder = sorted((app["data"] / "outputs" / "xyz").iterdir())[-1]
    cells = sorted(folder.glob("cell-*.png"))
    assert len(cells) == 2
    recipe = json.loads(read_png_info(cells[0])["sdmw_recipe"])
    assert len(recipe["mbw_alpha"]) == 26
    assert "roll 1 α " + " ".join(f"{v:g}" for v in recipe["mbw_alpha"][:5]) in caption


def test_reservations_can_be_managed_and_show_progress(page, app):
    _open_xyz(page)
    fill_axis(page, "X", "alpha", "0.1,0.3,0.5,0.7,0.9")
    fill_axis(page, "Y", "seed", "1,2")
    page.fill("#prompt textarea", "a cat --w 64 --h 64 --s 4 --d 1")
    first = click_and_wait(page, "#xyz_reserve", ("reserved", "Error"), sel="#xyz_status textarea")
    assert first.startswith("reserved plot(s) #"), first
    again = click_and_wait(page, "#xyz_reserve", ("reserved", "Error"), sel="#xyz_status textarea")
    first_id = first.split("#")[1]
    assert f"the same plot is already reserved as #{first_id}" in again, again
    fill_axis(page, "X", "alpha", "0.4,0.6")
    click_and_wait(page, "#xyz_reserve", ("reserved", "Error"), sel="#xyz_status textarea")
    page.get_by_role("tab", name="Reservations").click()
    page.locator("#res_refresh").wait_for(state="visible")
    page.click("#res_refresh")
    page.wait_for_function("document.querySelector('#res_table').innerText.split('waiting').length === 4")

    def pick_row(entry_id):
        cells = page.locator("#res_table").get_by_text(entry_id, exact=True)
        cells.nth(next(i for i in range(cells.count()) if cells.nth(i).is_visible())).click()
        page.wait_for_function("([id]) => document.querySelector('#res_picked textarea').value === id", arg=[entry_id])
    dup_id = str(int(first_id) + 1)
    pick_row(dup_id)
    assert click_and_wait(page, "#res_delete", ("deleted", "Error"), sel="#res_status textarea") == f"deleted #{dup_id}"
    last_id = str(int(first_id) + 2)
    pick_row(last_id)
    click_and_wait(page, "#res_up", ("moved", "Error"), sel="#res_status textarea")
    rows = page.inner_text("#res_table")
    assert rows.index("0.4,0.6") < rows.index("0.1,0.3"), rows              # the small plot runs first now
    page.click("#res_start")
    page.wait_for_function("document.querySelector('#res_status textarea').value.includes(' cells')",
                           timeout=120_000)                                    # live: "running #n: k/N cells"
    assert page.input_value("#res_status textarea").startswith("running #")
    page.wait_for_function("/running #\\d+: [1-9]\\d*\\/10 cells/.test(document.querySelector('#res_status textarea')"
                           ".value)", timeout=120_000, polling=100)     # the second plot part-way, the first done
    page.wait_for_function("document.querySelector('#res_table').innerText.includes('/10 cells')")
    page.screenshot(path=str(DOCS / "reservations.png"), full_page=True)
    page.wait_for_function("document.querySelector('#res_status textarea').value.endsWith('reservation(s) run')",
                           timeout=180_000)
    table = page.inner_text("#res_table")
    assert "10/10 cells" in table and "4/4 cells" in table
    pick_row(first_id)
    msg = click_and_wait(page, "#res_retry", ("run again", "Error"), sel="#res_status textarea")
    assert msg == f"#{first_id} will run again", msg
    msg = click_and_wait(page, "#res_clear", ("cleared", "Error"), sel="#res_status textarea")
    assert msg.startswith("cleared") and "waiting" in page.inner_text("#res_table")
    msg = click_and_wait(page, "#res_clear_all", ("cleared", "Error"), sel="#res_status textarea")
    assert msg.startswith("cleared"), msg
    page.get_by_role("tab", name="Merge").click()


def test_lora_tab_shows_list_and_metadata_at_once_and_keeps_its_own_output(page, app):
    page.get_by_role("tab", name="LoRA").click()
    page.locator("#lora_table").wait_for(state="visible")
    page.wait_for_function("document.querySelector('#lora_table').innerText.includes('demo-sd1-tiny-lora')")
    page.click("#lora_meta_accordion")
    page.wait_for_selector("#lora_meta")
    page.wait_for_function("document.querySelector('#lora_meta').innerText.includes('ss_network_dim')")
    page.click("#lora_more_accordion")
    page.wait_for_selector("#lora_e_b")
    assert _value(page, "#lora_e_a input") != _value(page, "#lora_e_b input")
    assert page.is_visible("#lora_overwrite")
    page.fill("#lora_spec textarea", "demo-sd1-tiny-lora:0.6")
    msg = click_and_wait(page, "#lora_merge_gen", ("generated", "Error"), sel="#lora_status textarea")
    assert "generated 1 image" in msg, msg
    page.wait_for_selector("#lora_gallery img")
    page.fill("#lora_m_spec textarea", "demo-sd1-tiny-lora:0.5")
    page.fill("#lora_m_out textarea", "browser-merged-lora")
    msg = click_and_wait(page, "#lora_m_go", ("saved", "Error"), sel="#lora_status textarea")
    assert msg.startswith("saved"), msg
    meta = read_safetensors_header(app["dirs"].lora / "browser-merged-lora.safetensors")[0]["__metadata__"]
    assert meta["ss_network_dim"] and meta["ss_network_alpha"] and meta["ss_base_model_version"] == "sd_v1"
    msg = click_and_wait(page, "#lora_m_go", ("saved", "Error"), sel="#lora_status textarea")
    assert "already exists" in msg and "tick Overwrite in the app" in msg, msg
    page.check("#lora_overwrite input")
    msg = click_and_wait(page, "#lora_m_go", ("saved", "Error"), sel="#lora_status textarea")
    assert msg.startswith("saved"), msg
    page.get_by_role("tab", name="Merge").click()


def test_regional_lora_mask_in_the_generation_panel(page, app, tmp_path):
    from PIL import Image
    page.get_by_role("tab", name="Merge").click()
    page.fill("#prompt textarea", "a red fox --w 64 --h 64 --s 3 --d 5")
    page.click("#gen_loras")
    pick(page, "#gen_lora_0", "demo-sd1-tiny-lora.safetensors")
    mask = tmp_path / "mask.png"
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 32, 64))
    im.save(mask)
    page.set_input_files("#lora_mask input[type=file]", str(mask))
    page.wait_for_selector("#lora_mask img")
    msg = click_and_wait(page, "#merge_gen", ("generated", "Error"))
    assert "generated 1 image" in msg, msg
    assert "LoRA mask: R: demo-sd1-tiny-lora.safetensors:1" in page.input_value("#pnginfo textarea")
    page.wait_for_function("document.querySelectorAll('#gallery .thumbnail-item').length === 2")
    assert "regional mask over the image" in page.inner_text("#gallery")
    page.click("#lora_mask button[aria-label='Remove Image']")          # back to no mask for later tests
    page.wait_for_function("!document.querySelector('#lora_mask img')")


def test_hires_img2img_merge_id_png_recall_inex_print_and_attn2(page, app, tmp_path):
    """Runs last: it leaves a start image in the img2img box."""
    page.get_by_role("tab", name="Merge").click()
    pick(page, "#model_b", B)
    page.fill("#alpha input", "0.35")
    page.press("#alpha input", "Enter")
    page.fill("#prompt textarea", "a red fox --w 64 --h 64 --s 4 --d 11")
    page.click("#hires_accordion")
    page.check("#hires input")
    page.click("text=Save options")
    page.locator("#id_to label", has_text="image").click()
    msg = click_and_wait(page, "#merge_gen", ("generated", "Error"))
    assert "generated 1 image" in msg, msg
    info = page.input_value("#pnginfo textarea")
    assert "Hires upscale: 2, Hires upscaler: Latent" in info and "Size: 64x64" in info and "Merge ID: " in info
    merge_id = info.split("Merge ID: ")[1].split(",")[0].strip()
    newest = max((app["data"] / "outputs" / "images").glob("*.png"), key=lambda p: p.stat().st_mtime)
    from PIL import Image
    assert Image.open(newest).size == (128, 128)
    page.uncheck("#hires input")
    # PNG info -> settings: change things, drop the PNG, get them back
    page.fill("#alpha input", "0.9")
    page.press("#alpha input", "Enter")
    page.fill("#prompt textarea", "something else")
    page.click("#png_in_accordion")
    page.set_input_files("#png_in input[type=file]", str(newest))
    page.wait_for_function("document.querySelector('#status textarea').value.startsWith('loaded merge')",
                           timeout=30_000)
    assert "x 0.35" in page.input_value("#status textarea")
    page.wait_for_function("document.querySelector('#alpha input').value === '0.35'")
    assert page.input_value("#prompt textarea") == "a red fox"
    assert page.is_checked("#hires input")
    # img2img from an uploaded picture
    page.uncheck("#hires input")
    start = tmp_path / "start.png"
    Image.new("RGB", (90, 70), (200, 40, 40)).save(start)
    page.click("#img2img_accordion")
    page.set_input_files("#init_image input[type=file]", str(start))
    page.wait_for_selector("#init_image img")
    page.fill("#prompt textarea", "a red fox --w 64 --h 64 --s 4 --d 11")
    msg = click_and_wait(page, "#gen", ("generated", "Error"))
    assert "generated 1 image" in msg, msg
    assert "Denoising strength: 0.7" in page.input_value("#pnginfo textarea")
    assert f"Merge ID: {merge_id}" in page.input_value("#pnginfo textarea")
    # include / exclude "print"
    page.get_by_text("Elemental, include / exclude, adjust").click()
    page.locator("#inex label", has_text="Exclude").click()
    page.fill("#inex_text textarea", "IN01")
    msg = click_and_wait(page, "#inex_print", ("kept as model A's", "Error"))
    assert msg.endswith("merged") and "model.diffusion_model.input_blocks.1." in page.input_value("#inex_keys textarea")
    page.locator("#inex label", has_text="Off").click()
    # Analysis: attn2 per block
    page.get_by_role("tab", name="Analysis").click()
    page.locator("#analysis_go").wait_for(state="visible")
    page.get_by_label("cosine (attn2 per block)").check()
    msg = click_and_wait(page, "#analysis_go", ("blocks", "Error"), sel="#analysis_status textarea")
    assert msg == "cosine (attn2 per block): 16 blocks", msg
    page.get_by_role("tab", name="Merge").click()


def test_method_panel_merges_loads_and_hides(page, app):
    """Issue 13 in the browser: choose a method and its models, merge, see the row; Load settings
    shows a method recipe's panel and a mode recipe hides it again."""
    page.get_by_role("tab", name="Merge").click()
    page.fill("#load_id textarea", "-1")
    assert not page.is_visible("#method_models")
    pick(page, "#method", "ties")
    page.wait_for_selector("#method_models", state="visible")
    assert "TIES" in page.inner_text("#method_help") and not page.is_visible("#beta")
    page.wait_for_function("document.querySelector('#method_density input').value === '0.2'")   # its default
    assert not page.is_visible("#method_drop") and not page.is_visible("#method_stock")     # not read by TIES
    for name in (B, C):
        page.click("#method_models input")
        page.locator("ul[role=listbox] li", has_text=name).first.click()
    box = page.locator("#method_density input[type=number]").first
    box.fill("0.4")
    box.press("Enter")
    msg = click_and_wait(page, "#merge", ("merged", "Error"))
    assert msg.startswith("merged #") and "ties(demo-sd1-tiny-B, demo-sd1-tiny-C)" in msg and "k0.4" in msg, msg
    page.locator("#method_box").first.screenshot(path=str(DOCS / "method-panel.png"))   # shown in the README
    hist = MergeHistory(app["data"] / "mergehistory.csv")
    r = hist.recipe(-1)
    assert (r.method, r.models, r.density, r.model_b) == ("ties", [B, C], 0.4, "")
    dare = Recipe(A, method="dare_ties", models=[C, B], drop=0.3, seed=9, alpha=0.7)
    ids = [hist.append(dare, source="test"), hist.append(Recipe(A, B, alpha=0.35), source="test")]
    page.fill("#load_id textarea", str(ids[0]))
    click_and_wait(page, "#load_settings", ("loaded settings", "Error"))
    page.wait_for_function("document.querySelector('#method input').value === 'dare_ties'")
    assert page.is_visible("#method_models") and not page.is_visible("#beta")
    assert _value(page, "#method_drop input") == "0.3" and _value(page, "#method_seed input") == "9"
    assert page.locator("#method_models").inner_text().index("tiny-C") < \
        page.locator("#method_models").inner_text().index("tiny-B")          # M1, M2 in order
    page.fill("#load_id textarea", str(ids[1]))
    click_and_wait(page, "#load_settings", ("loaded settings", "Error"))
    page.wait_for_selector("#method_models", state="hidden")
    assert _value(page, "#method input") == "(none: merge mode)"
    msg = click_and_wait(page, "#merge", ("merged", "Error"))
    assert msg.startswith("merged #") and "x 0.35" in msg, msg
    log = (app["data"].parent / "app.log").read_text()
    assert "Traceback" not in log


def test_search_tab_one_preference_round(page, app):
    """Issue 14 in the browser: an eye search shows a batch of candidates, a pick brings the next
    batch (with the picked one kept)."""
    page.get_by_role("tab", name="Search").click()
    page.fill("#search_blocks textarea", "BASE OUT11")
    box = page.locator("#search_batch input[type=number]").first
    box.fill("3")
    box.press("Enter")
    page.fill("#search_study textarea", "browser-eye")
    msg = click_and_wait(page, "#search_start", ("round 1", "Error"), sel="#search_status textarea")
    assert "round 1" in msg and "pick the best of 3" in msg, msg
    page.wait_for_function("document.querySelectorAll('#search_gallery img').length >= 3")
    labels = page.locator("#search_pick label").all_inner_texts()
    assert len(labels) == 3, labels
    picked = labels[1].strip()
    page.locator("#search_pick label", has_text=picked).click()
    msg = click_and_wait(page, "#search_prefer", ("round 2", "Error"), sel="#search_status textarea")
    assert f"{picked} preferred" in msg, msg
    page.wait_for_function("([p]) => [...document.querySelectorAll('#search_pick label')].some("
                           "l => l.innerText.trim() === p)", arg=[picked])
    assert len(page.locator("#search_pick label").all_inner_texts()) == 3
    page.screenshot(path=str(DOCS / "search-tab.png"), full_page=True)   # shown in the README
    rows = MergeHistory(app["data"] / "mergehistory.csv")
    assert sum(1 for i in range(1, len(rows) + 1) if rows.get(i)["source"] == "search") == 5   # 3 + 2 rendered
    page.get_by_role("tab", name="Merge").click()


def test_search_tab_look_like_run_shows_best_trials_and_plot(page, app, tmp_path):
    from PIL import Image
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 80, 40)).save(ref)
    page.get_by_role("tab", name="Search").click()
    page.locator("#search_objective label", has_text="look like these images").click()
    page.locator("#search_references input[type=file]").set_input_files(str(ref))
    page.fill("#search_study textarea", "browser-like")
    box = page.locator("#search_trials input[type=number]").first
    box.fill("3")
    box.press("Enter")
    msg = click_and_wait(page, "#search_start", ("trials", "Error"), sel="#search_status textarea")
    assert "3 trials (3 now)" in msg and "best trial" in msg, msg
    page.wait_for_function("document.querySelectorAll('#search_gallery img').length === 3")
    assert "score" in page.inner_text("#search_gallery")
    assert page.input_value("#search_best_id textarea").isdigit()
    msg = click_and_wait(page, "#search_to_merge", ("Merge tab", "Error"), sel="#search_status textarea")
    page.get_by_role("tab", name="Merge").click()
    page.wait_for_function("document.querySelector('#status textarea').value.startsWith('loaded settings of merge #')")


def test_flux_model_a_shows_61_sliders_and_merges_into_a_file(page, app):
    """Issue 16 in the browser: a Flux model A switches the MBW sliders to Flux's 61 blocks (the
    double and single blocks grouped), its presets fill 61 values, and Merge and Gen, which cannot
    generate here (no T5 tokenizer given, transformer-only files), saves the merge to a file with a
    history row and says why it did not generate."""
    import safetensors.torch as st
    import torch

    from merger.flux_layout import PREFIX, strip_prefix
    from merger.synthetic import random_checkpoint
    ckpt = app["dirs"].ckpt
    for name, seed in (("flux-a.safetensors", 1), ("flux-b.safetensors", 2)):
        sd = random_checkpoint("flux", seed=seed, dtype=torch.bfloat16)
        st.save_file({strip_prefix(k): v.to(torch.float8_e4m3fn) for k, v in sd.items() if k.startswith(PREFIX)},
                     str(ckpt / name))
    page.get_by_role("tab", name="Merge").click()
    click_and_wait(page, "#refresh_models", ("checkpoints",))
    pick(page, "#model_a", "flux-a.safetensors")
    pick(page, "#model_b", "flux-b.safetensors")
    if not page.is_visible("#use_mbw"):
        page.click("#mbw_accordion")
    page.wait_for_selector("#mbw_flux", state="visible")
    assert not page.is_visible("#mbw_BASE") and page.is_visible("#mbw_CLIP") and not page.is_visible("#mbw_D05")
    page.click("#mbw_flux_double")
    page.wait_for_selector("#mbw_D05", state="visible")
    pick(page, "#mbw_preset", "DOUBLE_ONLY")
    page.wait_for_function("document.querySelector('#mbw_alpha textarea').value.split(',').length === 61")
    page.locator("#mbw_flux").first.screenshot(path=str(DOCS / "flux-sliders.png"))     # shown in the README
    assert _value(page, "#mbw_alpha textarea").split(",")[:5] == ["0", "0", "0", "1", "1"]
    page.locator("#use_mbw input").check()
    if not page.is_visible("#save_flags"):
        page.click("#save_accordion")
    page.locator("#save_flags label", has_text="save model").click()
    page.fill("#custom_name textarea", "flux-merged")
    msg = click_and_wait(page, "#merge_gen", ("into a file", "Error"))
    assert "into a file" in msg and "not generated: generating with Flux needs the T5 tokenizer" in msg, msg
    saved = ckpt / "flux-merged.safetensors"
    keys = read_safetensors_header(saved)[0]
    assert "double_blocks.0.img_attn.qkv.weight" in keys and keys["single_blocks.0.linear1.weight"]["dtype"] == "F8_E4M3"
    r = MergeHistory(app["data"] / "mergehistory.csv").recipe(-1)
    assert r.model_a == "flux-a.safetensors" and len(r.mbw_alpha) == 61 and r.mbw_alpha[3] == 1
    # back to an SD model: the 26 sliders return, the save flag is cleared again
    page.locator("#save_flags label", has_text="save model").click()
    page.locator("#use_mbw input").uncheck()
    pick(page, "#model_a", A)
    page.wait_for_selector("#mbw_BASE", state="visible")
    assert not page.is_visible("#mbw_flux")
    pick(page, "#model_b", B)
