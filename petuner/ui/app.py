"""The page: Compose (and preview the data), Watch, Compare, Chat, Export; assembled from the other modules.

The compose form is rendered from the schemas each time a group's choice changes (``gr.render``); its
buttons are wired inside the render, since their inputs are the fields of the current choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from petuner.config import GROUPS
from petuner.errors import PetunerError
from petuner.ui import launcher
from petuner.ui.compose import MULTI, RunSpec, composed, default_choices, menus
from petuner.ui.fields import Field
from petuner.ui.form import choices_of, describe, field_of, form_fields, spec_from, widget
from petuner.ui.preview import highlighted, prepared_data
from petuner.ui.tabs import Shared, chat_tab, compare_tab, export_tab, run_names, watch_tab

EXAMPLES_SHOWN = 2


def build_app(store: Path, config_dir: Path | None = None) -> gr.Blocks:
    """The whole page over the run store ``store`` (``adapters/``, re-scanned on every refresh), with the user's
    own config groups in ``config_dir`` beside the shipped ones (as ``petuner train --config-dir``)."""
    later: dict[str, Any] = {}  # components the compose form's Launch updates, made after it
    with gr.Blocks(title="petuner") as app:
        gr.Markdown("# petuner")
        with gr.Tabs() as tabs:
            with gr.Tab("Compose", id="compose"):
                _compose_tab(store, config_dir, later)
            shared = Shared(store=store)
            with gr.Tab("Watch", id="watch"):
                later.update(watch=watch_tab(shared), tabs=tabs)
            with gr.Tab("Compare", id="compare"):
                compare_tab(shared)
            with gr.Tab("Chat", id="chat"):
                chat_tab(shared)
            with gr.Tab("Export", id="export"):
                export_tab(shared)
        for function, outputs in shared.on_load:  # menus and tables as the store is now, not at server start
            app.load(function, None, outputs)
    return app


def _compose_tab(store: Path, config_dir: Path | None, later: dict[str, Any]) -> None:
    menus_row, processes = _menus(config_dir)
    with gr.Row():
        check_btn = gr.Button("Check and show the command", elem_id="check")
        launch_btn = gr.Button("Launch", variant="primary", elem_id="launch")
    error = gr.Markdown(elem_id="compose-error")
    command = gr.Textbox(label="command", elem_id="command", interactive=False, buttons=["copy"])
    config = gr.Code(label="composed config (as it would run)", language="yaml", elem_id="config")
    with gr.Accordion("Preview the data (the same report as `petuner data`)", open=False):
        data_file = gr.Textbox(label="a file on disk (sets data.path; empty: the form's data)", elem_id="data-file")
        preview_btn = gr.Button("Preview the data", elem_id="preview")
        summary = gr.Textbox(label="report", lines=4, elem_id="data-summary")
        examples = [gr.HighlightedText(label=f"training example {i} (highlighted: tokens with loss)",
                                       color_map={"loss": "green"}, elem_id=f"example-{i}")
                    for i in range(EXAMPLES_SHOWN)]

    @gr.render(inputs=[*menus_row])
    def form(*chosen: Any) -> None:
        choices = choices_of(chosen)
        fields = form_fields(choices, config_dir)
        widgets = _widgets(fields, "|".join(f"{g}={choices[g]}" for g in GROUPS))
        inputs, outputs = [processes, *widgets], [error, command, config, *widgets]
        check_btn.click(lambda p, *v: _check(choices, fields, p, v, config_dir), inputs, outputs)
        launch_btn.click(lambda p, *v: _launch(choices, fields, p, v, store, config_dir), inputs,
                         [*outputs, later["watch"], later["tabs"]])
        preview_btn.click(lambda path, p, *v: _preview(spec_from(choices, p, fields, v), path, config_dir),
                          [data_file, *inputs], [summary, *examples])


def _menus(config_dir: Path | None) -> tuple[list[gr.Dropdown], gr.Number]:
    """One menu per group (the shipped YAMLs and the user's own), the logger's taking several."""
    picked, offered = default_choices(config_dir), menus(config_dir)
    picked["logger"] = ["none"] if "none" in offered["logger"] else []
    dropdowns = []
    with gr.Row():
        for group in GROUPS:
            dropdowns.append(gr.Dropdown(choices=offered[group], value=picked.get(group), label=group,
                                         multiselect=group in MULTI, elem_id=f"choice-{group}"))
        processes = gr.Number(1, precision=0, minimum=1, label="processes (torchrun above 1)", elem_id="processes")
    return dropdowns, processes


def _widgets(fields: list[Field], tag: str) -> list[gr.components.Component]:
    widgets: list[gr.components.Component] = []
    groups = dict.fromkeys(f.group for f in fields)
    for group in groups:
        with gr.Accordion(group or "run", open=True), gr.Row(equal_height=False):
            widgets += [widget(f, f"{tag}:{f.path}") for f in fields if f.group == group]
    return widgets


def _outcome(fields: list[Field], message: str = "", command: str = "", config: str = "") -> list[Any]:
    """Error line (also beside the field it names), command, config, and every field's info text."""
    bad = field_of(message, fields) if message else None
    infos = [gr.update(info=f"⚠ {message}" if f is bad else describe(f)) for f in fields]
    return [f"**{message}**" if message else "", command, config, *infos]


def _check(choices: dict[str, Any], fields: list[Field], processes: Any, values: tuple[Any, ...],
           config_dir: Path | None) -> list[Any]:
    spec = spec_from(choices, processes, fields, values)
    try:
        cfg = composed(spec, config_dir)
    except PetunerError as err:
        return _outcome(fields, f"error: {err}")
    from omegaconf import OmegaConf

    argv = launcher.train_command(spec.overrides(), spec.processes, config_dir)
    return _outcome(fields, "", launcher.shown_command(argv), OmegaConf.to_yaml(cfg))


def _launch(choices: dict[str, Any], fields: list[Field], processes: Any, values: tuple[Any, ...], store: Path,
            config_dir: Path | None) -> list[Any]:
    """Check as the command line would, then start the run detached; a bad value starts nothing."""
    checked = _check(choices, fields, processes, values, config_dir)
    if checked[0]:
        return [*checked, gr.update(), gr.update()]
    spec = spec_from(choices, processes, fields, values)
    run_dir = launcher.new_run_dir(store, choices)
    argv = launcher.start(run_dir, spec.overrides(), spec.processes, config_dir)
    checked[1] = launcher.shown_command(argv)
    return [*checked, gr.update(choices=run_names(store), value=run_dir.name), gr.Tabs(selected="watch")]


def _preview(spec: RunSpec, path: str, config_dir: Path | None) -> list[Any]:
    if path and path.strip():
        spec.changed["data.path"] = path.strip()
    overrides = spec.overrides()
    try:
        data, tokenizer = prepared_data(overrides, config_dir)
    except PetunerError as err:
        return [f"error: {err}", *([None] * EXAMPLES_SHOWN)]
    summary, shown = highlighted(data, tokenizer, EXAMPLES_SHOWN)
    return [summary, *(shown + [None] * EXAMPLES_SHOWN)[:EXAMPLES_SHOWN]]
