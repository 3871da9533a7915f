"""`sds3d app` (app.py): the Studio behind the page (checks, shared prior, Stop and Resume, the run
list) without a browser, and the page itself end to end in Debian's headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from sds3d import app as app_mod
from sds3d.app import Studio, list_runs, run_info
from sds3d.cli import main
from sds3d.errors import UserError


def _step(status: str) -> int:
    """The step a progress line reports ("'a red cube': step 7/30, …"), else 0."""
    found = re.search(r": step (\d+)/", status)
    return int(found.group(1)) if found else 0


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sds3d: error: ") and "\n" not in err
    return err.removeprefix("sds3d: error: ")


@pytest.mark.parametrize(
    "prompt, preset, steps, seed, cli_args",
    [
        ("   ", "fast", 10, 0, ["generate", "   "]),
        ("a teapot", "fast", 10, 0, ["generate", "a teapot", "--steps", "1"]),
        ("a red cube", "nope", 10, 0, ["generate", "a red cube", "--preset", "nope"]),
    ],
)
def test_bad_input_gives_the_clis_one_line(tmp_path, capsys, prompt, preset, steps, seed, cli_args):
    studio = Studio(tmp_path / "outputs")
    with pytest.raises(UserError) as err:
        studio.config_for(prompt, preset, steps, seed)
    cli = _cli_error(capsys, [*cli_args, "--out", str(tmp_path / "cli")])
    assert str(err.value) == cli
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cli").exists()  # nothing written


@pytest.mark.parametrize(
    "steps, seed, cli_args",
    [
        (0, 0, ["--steps", "0"]),
        (2.5, 0, ["--steps", "2.5"]),
        ("x", 0, ["--steps", "x"]),
        (5, -1, ["--seed", "-1"]),
    ],
)
def test_bad_numbers_are_the_clis_one_line(tmp_path, capsys, steps, seed, cli_args):
    with pytest.raises(UserError) as err:
        Studio(tmp_path).config_for("a red cube", "fast", steps, seed)
    assert str(err.value) == _cli_error(
        capsys, ["generate", "a red cube", *cli_args, "--out", str(tmp_path / "c")]
    )


def test_settings_reach_the_config_and_the_prior_is_loaded_once(tmp_path, monkeypatch):
    built = []
    from sds3d import train as train_mod

    real_build = train_mod.build_prior
    monkeypatch.setattr(train_mod, "build_prior", lambda config: built.append(1) or real_build(config))
    studio = Studio(tmp_path, device="cpu")
    a = studio.config_for("  a red   cube ", "fast", 40, 7)
    b = studio.config_for("a blue torus", "default", "20", 3.0)
    assert (a.prompt, a.preset, a.steps, a.seed, a.device) == ("a red cube", "fast", 40, 7, "cpu")
    assert (b.preset, b.steps, b.seed) == ("default", 20, 3)
    assert a.validate_every == 4 and a.checkpoint_every <= 4  # live renders over the run, Stop keeps them
    assert studio.prior_for(a) is studio.prior_for(b) and len(built) == 1


def test_stop_keeps_a_checkpoint_and_resume_finishes(tmp_path):
    studio = Studio(tmp_path / "outputs")
    config = studio.config_for("a blue sphere", "fast", 30, 3)
    updates = []
    for update in studio.new_run(config, session="tab"):
        updates.append(update)
        if _step(update.status) >= 2:
            assert studio.stop("tab")
    last = updates[-1]
    assert last.done and last.status.startswith("stopped at step ") and not last.files
    [info] = list_runs(studio.outputs)
    assert info.status == "stopped" and 2 <= info.step < 30 and info.path == last.run_dir
    assert not studio.stop("tab")  # nothing runs any more
    assert any(u.validation is not None for u in updates)  # live renders reached the page
    with pytest.raises(UserError, match="no run to resume"):
        list(studio.resume("", "tab"))
    updates = list(studio.resume(info.path, "tab"))
    assert updates[-1].status.startswith("done: 'a blue sphere', 30 steps"), updates[-1].status
    assert {"mesh.glb", "turntable.gif", "summary.json"} <= set(updates[-1].files)
    assert run_info(info.path).status == "done" and run_info(info.path).thumbnail.name == "turntable.gif"
    with pytest.raises(UserError, match="finished"):
        list(studio.resume(info.path, "tab"))
    untrained = studio.outputs / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text((info.path / "config.json").read_text())
    with pytest.raises(UserError, match="not trained yet"):
        list(studio.resume(untrained, "tab"))
    (tmp_path / "outputs" / "junk").mkdir()  # not a run: not listed
    (tmp_path / "outputs" / "junk" / "config.json").write_text("{oops")
    assert {i.path: i.status for i in list_runs(studio.outputs)} == {info.path: "done", untrained: "new"}


def test_runs_queue_and_stop_runs_beside_them(tmp_path):
    from sds3d.app import build_app

    demo = build_app(Studio(tmp_path))
    fns = {f.name: f for f in demo.fns.values()}
    assert fns["on_generate"].concurrency_limit == 1 == fns["on_resume"].concurrency_limit
    assert fns["on_generate"].concurrency_id == fns["on_resume"].concurrency_id  # one queue for both
    assert fns["on_stop"].queue is False  # Stop is not stuck behind the run it stops


def test_outputs_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "is a file" in _cli_error(capsys, ["app", "--outputs", str(tmp_path / "f")])


# --- the page in a real browser --------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _browser():
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None]
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as err:
        missing.append(err.name or "gradio/selenium")
    if missing:
        if os.environ.get("CI"):  # .ci/run installs them: a skip there would hide the test
            pytest.fail(f"the browser test needs {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)} (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, timeout: float, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        if value := what():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s")


def test_the_page_generates_a_mesh_in_a_real_browser(tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver = _browser()
    demo, url = app_mod.serve(Studio(tmp_path / "outputs"), port=_free_port(), block=False)
    try:
        assert url.startswith("http://127.0.0.1:")  # this machine only, unless --host says otherwise
        driver.get(url)
        find = lambda css: driver.find_element(By.CSS_SELECTOR, css)
        status = lambda: find("#status").text
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea, #prompt input"), 30)

        assert find("#steps input").get_attribute("value") == "800"  # the default preset's steps

        def ask(prompt: str, steps: int) -> None:
            box = find("#prompt textarea, #prompt input")
            box.clear()
            box.send_keys(prompt)
            field = find("#steps input")
            field.clear()
            field.send_keys(str(steps))
            find("#generate").click()

        ask("a teapot", 30)  # the CLI's one line, in the page
        text = _wait(lambda: status() if status().startswith("error:") else "", 60)
        assert "not a world prompt" in text or "teapot" in text, text
        ask("a red cube", 30)
        seen = set()

        def finished() -> str:
            seen.add(status())
            return status() if status().startswith(("done", "error", "stopped")) else ""

        _wait(lambda: _step(status()) >= 2, 120, poll=0.2)
        find("#stop").click()  # Stop keeps the checkpoint …
        text = _wait(finished, 120)
        assert text.startswith("stopped at step "), text
        find("#resume").click()  # … and Resume goes on from it
        _wait(lambda: not status().startswith("stopped"), 60, poll=0.2)
        text = _wait(finished, 400)
        assert text.startswith("done: 'a red cube', 30 steps"), text
        assert any("step " in s and "/30" in s for s in seen)  # live progress reached the page
        canvas = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#model canvas"), 30)[0]
        link = find("#model a[data-testid='model3d-download-link']").get_attribute("href")
        assert link.endswith("mesh.glb")

        def drawn():  # babylon.js has drawn the mesh: the canvas is not one flat colour
            pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"), dtype=float)
            background = pixels[2, 2]
            return np.abs(pixels - background).sum(-1).__gt__(30).mean() > 0.02

        _wait(drawn, 30, poll=1.0)
        names = {
            Path(a.get_attribute("href")).name for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a")
        }
        assert {"mesh.glb", "mesh.obj", "turntable.gif", "summary.json"} <= names, names
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#runs .thumbnail-item"), 30)  # listed
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert Path(tmp_path / "page.png").stat().st_size > 10_000
        [info] = list_runs(tmp_path / "outputs")
        assert info.status == "done" and (info.path / "mesh.glb").is_file()
    finally:
        driver.quit()
        demo.close()


def test_closing_the_page_mid_run_keeps_the_checkpoint(tmp_path):
    """The page went away (the generator is closed): the run stops and its checkpoint stays."""
    studio = Studio(tmp_path / "outputs")
    run = studio.new_run(studio.config_for("a green cone", "fast", 200, 0), session="gone")
    for update in run:
        if _step(update.status) >= 2:
            break
    run.close()  # GeneratorExit at the yield: the run is asked to stop and joined
    [info] = list_runs(studio.outputs)
    assert info.status == "stopped" and info.step >= 2
