"""The Watch, Compare, Chat and Export tabs: each reads run folders of the store and calls petuner's own code."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from petuner.choices import EXPORT_FORMATS, GGUF_DTYPES
from petuner.errors import PetunerError
from petuner.ui import charts, launcher
from petuner.ui import store as runs
from petuner.ui.chat import BASE, stream

REFRESH_S = 1.0  # how often the Watch tab re-reads the run folder
PROGRESS = gr.Progress()  # Gradio fills a handler's progress argument when its default is a Progress


@dataclass
class Shared:
    """What the tabs share: the store, and the menus to fill as a page opens."""

    store: Path
    on_load: list[tuple[Any, Any]] = field(default_factory=list)  # (function, output): run when a page opens

    def run(self, name: str | None) -> Path:
        """A run of the store by its folder name (a name with a path in it never leaves the store)."""
        if not name or Path(name).name != name or not (self.store / name).is_dir():
            raise PetunerError(f"no run {name!r} in {self.store}")
        return self.store / name


def run_names(store: Path, finished: bool = False) -> list[str]:
    dirs = runs.run_dirs(store)
    return [d.name for d in dirs if not finished or (d / "adapter.safetensors").is_file()]


def _latest(store: Path, finished: bool = False) -> Any:
    """A run menu as a page opens: the store's runs, the newest chosen."""
    names = run_names(store, finished)
    return gr.update(choices=names, value=names[0] if names else None)


def watch_tab(shared: Shared) -> gr.Dropdown:
    """Live curves, progress, ETA and the log tail of one run; Abort and Resume. Returns the run menu."""
    names = run_names(shared.store)
    with gr.Row():
        pick = gr.Dropdown(names, value=names[0] if names else None, label="run", elem_id="watch-run", scale=3)
        abort_btn = gr.Button("Abort (checkpoint and stop)", elem_id="abort", variant="stop")
        resume_btn = gr.Button("Resume", elem_id="resume")
    progress = gr.Markdown(elem_id="progress")
    curves = gr.Plot(label="curves", elem_id="curves")
    tail = gr.Textbox(label="log (tail)", lines=12, max_lines=12, elem_id="log-tail", autoscroll=True)

    def refresh(name: str | None, seen: str) -> list[Any]:
        """Re-read the run; the curves are drawn again only when metrics.jsonl changed."""
        menu = gr.update(choices=run_names(shared.store))
        if not name or not (shared.store / name).is_dir():
            return [menu, "", None, "", ""]
        run_dir = shared.run(name)
        frames = charts.run_frames(run_dir)
        points = int((frames["loss"]["series"] == "train/loss").sum())
        mark = f"{name}:{runs.metrics_mark(run_dir)}"
        drawn = gr.skip() if mark == seen else charts.figure(frames)
        return [menu, charts.progress_text(runs.state(run_dir), points), drawn, runs.log_tail(run_dir), mark]

    def act(name: str | None, action: Any) -> str:
        try:
            action(shared.run(name))
        except PetunerError as err:
            return f"error: {err}"
        return f"{action.__name__}: sent to {name}"

    seen = gr.State("")  # the metrics file state the plots show
    outputs = [pick, progress, curves, tail, seen]
    gr.Timer(REFRESH_S).tick(refresh, [pick, seen], outputs, show_progress="hidden")
    pick.change(refresh, [pick, gr.State("")], outputs)
    shared.on_load.append((lambda: _latest(shared.store), pick))
    abort_btn.click(lambda n: act(n, launcher.abort), pick, progress)
    resume_btn.click(lambda n: act(n, launcher.resume), pick, progress)
    return pick


def compare_tab(shared: Shared) -> None:
    """The store as a sortable table, several runs' curves overlaid, and a sweep's report."""
    refresh_btn = gr.Button("Refresh", elem_id="compare-refresh")
    table = gr.Dataframe(elem_id="runs-table", interactive=False, wrap=True)
    chosen = gr.Dropdown(run_names(shared.store), multiselect=True, label="runs to overlay", elem_id="overlay-runs")
    overlaid = gr.Plot(label="curves by run", elem_id="overlay")
    with gr.Accordion("A sweep's report (petuner sweep-report)", open=False):
        sweep = gr.Dropdown([], value=None, label="sweep", elem_id="sweep")
        sweep_table = gr.Dataframe(interactive=False, elem_id="sweep-table")
        sweep_plots = gr.Gallery(label="plots", columns=3, fit_columns=False, object_fit="contain", preview=False,
                                 elem_id="sweep-plots")

    def table_rows() -> list[Any]:
        rows = pd.DataFrame([runs.summary(d) for d in runs.run_dirs(shared.store)])
        return [rows, gr.update(choices=run_names(shared.store))]

    def overlay(names: list[str] | None) -> Any:
        dirs = [shared.run(n) for n in names or []]
        return charts.figure({name: charts.overlay(dirs, name) for name in charts.OVERLAID}, columns=2)

    def report(name: str | None) -> list[Any]:
        from petuner.sweep import sweep_report

        if not name:
            return [None, None]
        folder = shared.store / runs.SWEEPS / Path(name).name
        sweep_report(folder)
        table = pd.read_csv(folder / "sweep_report.csv", keep_default_na=False)  # an empty error stays empty
        return [table, sorted(str(p) for p in folder.glob("*.png"))]

    refresh_btn.click(table_rows, None, [table, chosen])
    shared.on_load.append((table_rows, [table, chosen]))
    shared.on_load.append((lambda: gr.update(choices=[p.name for p in runs.sweep_dirs(shared.store)], value=None),
                           sweep))
    chosen.change(overlay, chosen, overlaid)
    sweep.change(report, sweep, [sweep_table, sweep_plots])


def chat_tab(shared: Shared) -> None:
    """Streamed chat with a run; optionally the same prompt to a second run or to the run's bare base."""
    finished = run_names(shared.store, finished=True)
    with gr.Row():
        first = gr.Dropdown(finished, value=finished[0] if finished else None, label="run", elem_id="chat-run")
        second = gr.Dropdown(["(none)", *finished, *(n + BASE for n in finished)], value="(none)",
                             label="side by side with", elem_id="chat-other")
        reload_btn = gr.Button("Refresh runs", elem_id="chat-refresh")
    with gr.Row():
        max_new = gr.Number(64, precision=0, label="max new tokens", elem_id="max-new-tokens")
        temperature = gr.Number(0.0, label="temperature (0: greedy)", elem_id="temperature")
        top_p = gr.Number(1.0, label="top p", elem_id="top-p")
        seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
    with gr.Row():
        left = gr.Chatbot(label="the run", elem_id="chat-left", height=300)
        right = gr.Chatbot(label="side by side: the same prompts", elem_id="chat-right", height=300)
    message = gr.Textbox(label="message", elem_id="chat-message", submit_btn=True)
    status = gr.Markdown(elem_id="chat-status")

    def send(text: str, a: str, b: str, ha: list[dict[str, str]], hb: list[dict[str, str]], *sampling: Any
             ) -> Iterator[list[Any]]:
        from petuner.generate import Sampling

        pairs = [(a, list(ha or []))] + ([(b, list(hb or []))] if b and b != "(none)" else [])
        outs = [list(ha or []), list(hb or [])]
        try:
            settings = Sampling(int(sampling[0]), float(sampling[1]), float(sampling[2]), int(sampling[3]))
            for i, (target, history) in enumerate(pairs):
                shared.run(target.removesuffix(BASE))
                history.append({"role": "user", "content": text})
                for partial in stream(str(shared.store / target), history, settings):
                    outs[i] = [*history, {"role": "assistant", "content": partial}]
                    yield [*outs, ""]
        except PetunerError as err:
            yield [*outs, f"error: {err}"]

    shared.on_load.append((lambda: _latest(shared.store, True), first))
    shared.on_load.append((lambda: _chat_others(shared.store), second))
    message.submit(send, [message, first, second, left, right, max_new, temperature, top_p, seed],
                   [left, right, status]).then(lambda: "", None, message)
    reload_btn.click(lambda: [_latest(shared.store, True), _chat_others(shared.store)], None, [first, second])


def _chat_others(store: Path) -> Any:
    names = run_names(store, True)
    return gr.update(choices=["(none)", *names, *(n + BASE for n in names)], value="(none)")


def export_tab(shared: Shared) -> None:
    """peft / merged / quantized / GGUF, written where the page says (default: inside the run folder)."""
    finished = run_names(shared.store, finished=True)
    with gr.Row():
        pick = gr.Dropdown(finished, value=finished[0] if finished else None, label="run", elem_id="export-run")
        fmt = gr.Dropdown(list(EXPORT_FORMATS), value="peft", label="format", elem_id="export-format")
        dtype = gr.Dropdown(list(GGUF_DTYPES), value="f16", label="GGUF tensor type", elem_id="export-dtype")
    out = gr.Textbox(label="destination (empty: RUN/export-FORMAT)", elem_id="export-out")
    force = gr.Checkbox(label="replace an existing destination", elem_id="export-force")
    go = gr.Button("Export", variant="primary", elem_id="export")
    result = gr.Markdown(elem_id="export-result")

    def run_export(name: str, fmt_: str, dtype_: str, out_: str, force_: bool,
                   progress: gr.Progress = PROGRESS) -> str:
        from petuner.export import export

        try:
            run_dir = shared.run(name)
            dest = Path(out_.strip()) if out_ and out_.strip() else \
                run_dir / (f"export-{fmt_}" + (".gguf" if fmt_ == "gguf" else ""))
            progress(0.1, desc=f"loading {name} and writing {fmt_}")
            written = export(run_dir, fmt_, dest, force=force_, dtype=dtype_ if fmt_ == "gguf" else None)
        except PetunerError as err:
            return f"error: {err}"
        size = sum(p.stat().st_size for p in ([written] if written.is_file() else written.rglob("*")) if p.is_file())
        return f"written: `{written.resolve()}` ({size / 2**20:.1f} MiB)"

    go.click(run_export, [pick, fmt, dtype, out, force], result)
    shared.on_load.append((lambda: _latest(shared.store, True), pick))
    pick.focus(lambda: gr.update(choices=run_names(shared.store, True)), None, pick)
