"""The web page end to end in a real Chromium (Playwright driving Debian's ``chromium``), on the tiny model.

One scenario, as a user would go: log in (the server wants a password), compose a run and see a bad value's
one-line error beside its field with nothing started, see the command, preview the data, launch, watch the
loss curve gain points, abort (a loadable checkpoint is left), resume, close the browser and restart the UI
server while the resumed run trains; the restarted page shows it finished, with the same weights as an
unattended run of the same config; compare the two; chat with the run beside its bare base; export it.
Screenshots of each step: test-artifacts/ui/ (PETUNER_TEST_ARTIFACTS overrides the folder); docs/img/ holds
copies for docs/ui.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("gradio", reason="the web page needs the petuner[ui] extra (gradio)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")

from petuner.config import check_command_line  # noqa: E402
from petuner.errors import ConfigError  # noqa: E402
from petuner.ui import launcher  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: Playwright's own browser download is not reachable here
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("PETUNER_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
USER, PASSWORD = "tester", "correct horse"
FORM = {"data.limit": "64", "data.eval_size": "16", "data.max_length": "64", "trainer.batch_size": "4",
        "trainer.eval_every": "50", "optimizer.warmup_steps": "0", "optimizer.lr": "1e-2"}
STEPS = "300"  # long enough that Abort lands mid-run on an idle machine (100 steps could finish first)
WAIT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``petuner ui`` in its own process, behind a password, on a free port."""

    def __init__(self, cwd: Path, store: Path):
        self.cwd, self.store, self.port = cwd, store, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
        log = open(self.cwd / f"server-{time.time():.0f}.log", "wb")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen([sys.executable, "-m", "petuner", "ui", "--port", str(self.port), "--store",
                                         str(self.store), "--auth", f"{USER}:{PASSWORD}"], cwd=self.cwd, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, (self.cwd / log.name).read_text()
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise AssertionError("petuner ui did not start within 120 s")

    def stop(self) -> None:
        """Ctrl-C in the server's terminal: SIGINT to its whole process group (a run it started must survive)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium (make setup does)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def shot(page: object, name: str, elem_id: str | None = None) -> None:
    """A screenshot of the page (or of one element) into the artifact folder."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = page.locator(f"#{elem_id}") if elem_id else page  # type: ignore[attr-defined]
    target.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    print(f"{time.strftime('%H:%M:%S')} {name}", file=sys.stderr)


def logged_in(browser: object, server: Server) -> tuple[object, object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url, wait_until="domcontentloaded")  # not "load": no web fonts to wait for offline
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_selector("#field-trainer-max_steps")
    return context, page


def choose(page: object, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first  # type: ignore[attr-defined]
    box.click()
    box.fill(value)
    page.locator(f"ul[role=listbox] li[aria-label='{value}']").first.click()  # type: ignore[attr-defined]


def fill(page: object, path: str, value: str) -> None:
    page.locator(f"#field-{path.replace('.', '-')} input").first.fill(value)  # type: ignore[attr-defined]


def text(page: object, elem_id: str) -> str:
    """What an element shows: its text, and the values of its text boxes."""
    return page.locator(f"#{elem_id}").evaluate(  # type: ignore[attr-defined]
        "e => [e.innerText, ...[...e.querySelectorAll('input, textarea')].map(i => i.value)].join('\\n')")


def wait_text(page: object, elem_id: str, pattern: str) -> re.Match[str]:
    deadline = time.time() + WAIT_MS / 1000
    while time.time() < deadline:
        found = re.search(pattern, text(page, elem_id))
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"#{elem_id} never showed {pattern!r}; it shows {text(page, elem_id)!r}")


def tab(page: object, name: str) -> None:
    page.locator(f"button[role=tab]:has-text('{name}')").first.click()  # type: ignore[attr-defined]


def no_page_without_password(server: Server) -> None:
    for path in ("config", "gradio_api/info"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + path, timeout=10)
        assert refused.value.code == 401
    assert b"choice-model" not in urllib.request.urlopen(server.url, timeout=10).read()


def compose(page: object, store: Path) -> None:
    """A bad value: the command line's line beside the field, nothing started; then the command."""
    choose(page, "choice-model", "tiny_llama")
    page.wait_for_function("document.querySelector('#field-model-random_init input').value.includes('llama')")
    for path, value in {**FORM, "trainer.max_steps": "0"}.items():
        fill(page, path, value)
    with pytest.raises(ConfigError) as expected:
        check_command_line(["model=tiny_llama", "trainer.max_steps=0"])
    page.click("#launch")
    wait_text(page, "compose-error", re.escape(f"error: {expected.value}"))
    assert f"error: {expected.value}" in text(page, "field-trainer-max_steps")  # beside the field
    assert [p.name for p in store.iterdir()] == ["sweeps"]  # nothing started
    shot(page, "1-bad-value")
    shot(page, "1-bad-value-field", "field-trainer-max_steps")
    fill(page, "trainer.max_steps", STEPS)
    page.click("#check")
    page.wait_for_function("document.querySelector('#command input, #command textarea').value.length > 0")
    command = page.locator("#command input, #command textarea").first.input_value()
    assert command.startswith("petuner train model=tiny_llama ") and f"trainer.max_steps={STEPS}" in command
    assert f"max_steps: {STEPS}" in text(page, "config")
    shot(page, "2-compose")


def preview(page: object) -> None:
    page.get_by_text("Preview the data").first.click()
    page.click("#preview")
    wait_text(page, "data-summary", "training on 64 examples, evaluating on 16")
    page.locator("#example-0").scroll_into_view_if_needed()
    assert "LOSS" in text(page, "example-0").upper()  # the labelled span is highlighted
    shot(page, "3-data")


def launch_watch_abort(page: object, store: Path) -> Path:
    """Launch; the curve gains points while it trains; Abort leaves a loadable checkpoint."""
    import petuner

    page.click("#launch")
    points = rf"running · step \d+ / {STEPS} · (\d+) loss points"
    first = int(wait_text(page, "progress", points).group(1))
    later = first
    while later <= first:  # the curve gains points while the run trains
        later = int(wait_text(page, "progress", points).group(1))
    assert later > first and page.locator("#curves img, #curves svg, #curves canvas").count() > 0
    shot(page, "4-watch")
    page.click("#abort")
    wait_text(page, "progress", r"aborted[\s\S]*error: stopped by SIGTERM after step \d+")
    shot(page, "5-aborted")
    (run_dir,) = [d for d in store.iterdir() if d.name != "sweeps"]
    step = re.search(r"after step (\d+)", text(page, "progress")).group(1)
    petuner.load(run_dir, checkpoint=f"step-{step}")  # the last checkpoint loads
    return run_dir


def resume_and_restart(page: object, context: object, server: Server, run_dir: Path) -> None:
    """Resume, then close the browser and restart the server while the run trains.
    The server is stopped as Ctrl-C stops it: SIGINT to its whole process group. Planted bug this failed on:
    runs started without a session of their own (there Abort's signal to the run's process group missed)."""
    page.click("#resume")
    deadline = time.time() + 60
    while not launcher.is_running(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    context.close()  # type: ignore[attr-defined]
    assert launcher.is_running(run_dir), "the resumed run should still be training when the server stops"
    server.stop()
    server.start()


def same_weights_as_unattended(run_dir: Path, store: Path) -> None:
    """The same command the page launched, run straight through in its own process with the server's environment
    (an in-process run would inherit this test process's thread count)."""
    overrides = [o for o in json.loads((run_dir / launcher.LAUNCH_FILE).read_text())["overrides"]
                 if o != "trainer.resume=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as the server's runs: a thread count
    # changes the order of float sums, so weights are bit-identical only between runs with the same one
    done = subprocess.run(launcher.train_command([*overrides, f"run_dir={store / 'unattended'}"]), cwd=store.parent,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(run_dir / "adapter.safetensors"), load_file(store / "unattended" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sweep_folder(store: Path) -> None:
    """A finished two-job sweep's folders (what ``petuner train -m adapter.r=4,8`` leaves), for the report."""
    for job, (r, loss) in enumerate([(4, 2.5), (8, 2.25)]):
        folder = store / "sweeps" / "2026-01-01_00-00-00" / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- adapter.r={r}\n")
        (folder / "status.json").write_text(json.dumps({"status": "ok", "seconds": 10.0}))
        (folder / "run.json").write_text(json.dumps({"results": {"eval/loss_after": loss}, "trainable_parameters": r}))


def compare_chat_export(page: object, run_dir: Path) -> None:
    tab(page, "Compare")
    page.click("#compare-refresh")
    wait_text(page, "runs-table", rf"{run_dir.name}[\s\S]*unattended|unattended[\s\S]*{run_dir.name}")
    for name in (run_dir.name, "unattended"):
        choose(page, "overlay-runs", name)
    page.keyboard.press("Escape")
    page.wait_for_selector("#overlay img, #overlay svg")
    shot(page, "7-compare")
    page.get_by_text("A sweep's report").first.click()
    choose(page, "sweep", "2026-01-01_00-00-00")
    wait_text(page, "sweep-table", r"adapter\.r[\s\S]*2\.25")
    page.wait_for_selector("#sweep-plots img")
    shot(page, "7-sweep")
    tab(page, "Chat")
    page.click("#chat-refresh")
    choose(page, "chat-run", run_dir.name)
    choose(page, "chat-other", f"{run_dir.name} (base)")
    page.locator("#chat-message textarea").fill("How are you?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#chat-right .bot, #chat-right [data-testid=bot]').length > 0")
    assert not text(page, "chat-status").startswith("error")
    shot(page, "8-chat")
    tab(page, "Export")
    choose(page, "export-run", run_dir.name)
    page.click("#export")
    written = Path(wait_text(page, "export-result", r"written: (\S+) ").group(1))
    assert written == run_dir / "export-peft" and (written / "adapter_model.safetensors").is_file()
    shot(page, "9-export")


def test_the_whole_workflow_in_a_browser(browser: object, tmp_path: Path) -> None:
    store = tmp_path / "adapters"
    sweep_folder(store)
    server = Server(tmp_path, store)
    server.start()
    try:
        no_page_without_password(server)
        context, page = logged_in(browser, server)
        compose(page, store)
        preview(page)
        run_dir = launch_watch_abort(page, store)
        resume_and_restart(page, context, server, run_dir)
        context, page = logged_in(browser, server)
        tab(page, "Watch")
        choose(page, "watch-run", run_dir.name)
        wait_text(page, "progress", rf"finished · step {STEPS} / {STEPS}")
        shot(page, "6-finished-after-restart")
        same_weights_as_unattended(run_dir, store)
        compare_chat_export(page, run_dir)
        context.close()  # type: ignore[attr-defined]
    finally:
        server.stop()
