"""Gradio's file cache swept by age, never all at once.

gradio keeps a copy of every upload and of every file it serves (downloads, saved conversations, example pictures,
the Train tab's offered files) in one folder that every gradio app on the machine shares, each file's place named
by its content. Kept, a public Space's disk grew with every distinct upload (up to 20 MB each). gradio's own sweep
(`Blocks(delete_cache=...)`) also removes every file an app made when that app stops: the very same files of any
other app running beside it, whose examples and offered files then answered 404. This sweep removes, at a steady
interval, only the files of this app older than an age; a file handed out again is touched by gradio, so a file in
use stays.
"""

from __future__ import annotations

import threading

import gradio as gr

SWEEP_EVERY_S = 3600.0
KEEP_FOR_S = 4 * 3600.0


def sweep_by_age(demo: gr.Blocks, every_s: float = SWEEP_EVERY_S, age_s: float = KEEP_FOR_S) -> threading.Event:
    """Start removing, every `every_s` seconds while `demo` runs, the cached files it made that are older than
    `age_s`; setting the returned event stops it."""
    from gradio.route_utils import delete_files_created_by_app

    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(every_s) and demo.is_running:
            delete_files_created_by_app(demo, age_s)

    threading.Thread(target=sweep, name="gradio-cache-sweep", daemon=True).start()
    return stop
