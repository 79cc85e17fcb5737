"""The LLaMA-Adapter Gradio app: chat, image questions, the gate slider, a side-by-side comparison with the
frozen base, held-out records scored at each gate scale, the gates made visible, and what is loaded.

UI layout only: the events it wires are `adapter.app_handlers.Handlers` (every model call going through
`adapter.engine`), and what it offers to click comes from `adapter.app_examples`. `python app.py` serves the
embedded tiny model on CPU; `python app.py --help` lists the flags (each also an ADAPTER_* environment variable,
see the README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

if not os.environ.get("GRADIO_SERVER_PORT", "7860").strip().isdigit():  # gradio reads it as it is imported
    print(f"error: GRADIO_SERVER_PORT: {os.environ['GRADIO_SERVER_PORT']!r} is not a whole number", file=sys.stderr)
    sys.exit(2)

import gradio as gr  # noqa: E402  (after the check above)
from PIL import Image

from adapter.adapter_upload import MAX_UPLOADED, AdapterUploads
from adapter.app_config import (
    QUEUE_PER_WORKER,
    ServeConfig,
    check_listening,
    engine_for,
    load_engines,
    parse_config,
    serves_tiny,
)
from adapter.app_examples import (
    EXAMPLE_QUESTION,
    TINY_TRAINING_IMAGES,
    TINY_TRAINING_RECORDS,
    example_images,
    examples,
    tiny_held_out,
    tiny_held_out_images,
    tiny_training_images,
    tiny_training_records,
)
from adapter.app_handlers import (
    GATE_COLUMNS,
    LOSS_COLUMNS,
    SCORE_HEADERS,
    Handlers,
    gate_label,
    picture,
    start_choices,
)
from adapter.arg_types import unicode_output
from adapter.cache_sweep import sweep_by_age
from adapter.engine import (
    MAX_SCALE,
    MAX_SCORE_RECORDS,
    MAX_SCORE_TOKENS,
    MAX_SWEEP,
    MAX_TEMPERATURE,
    NEXT_TOKENS_TOP_K,
    Engine,
    Engines,
    Settings,
)
from adapter.interrupts import terminated_raises
from adapter.live_training import MAX_LORA_RANK, VALIDATIONS, LiveTraining
from adapter.model import Transformer
from adapter.prompts import PROMPT_FORMATS
from adapter.releases import OFFICIAL

DEFAULTS = Settings()
MAX_UPLOAD = "20mb"
BUTTON_WIDTH = 48  # px: a row of short buttons stays one row on a phone (gradio's 160 stacked them)
SWEEP = "0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2"  # the gate sweep's default scales
TRAIN_MODES = [("v1: adaption prompts and gates", "v1"), ("v2: also zero-init biases and tuned norms", "v2"),
               ("LoRA alone (no prompts, no gates: the baseline)", "lora")]
DOWNLOAD_FORMATS = [("ours: adapter.safetensors and adapter.json, zipped", "native"),
                    ("PEFT: a raw-gate v1 adapter or LoRA alone, zipped", "peft"),
                    ("the official v1 release's .pth: prompts and gates only", "official-v1")]
VISION_MODE = ("vision: v2 and a visual prompt on the served CLIP tower (image records)", "vision")


def range_checked_by_settings(slider: gr.Slider) -> None:
    """Let `Settings` check the slider's range instead of gradio, so that an out-of-range value sent through the
    API gets an error naming the setting (gradio's own says only "Value 3.0 is greater than ...").

    Done on the instance: gradio writes a .pyi stub next to any file that defines a component subclass."""
    slider.preprocess = lambda payload: payload


def clear_image_errors(image: gr.Image) -> None:
    """An upload that does not decode gets an error naming it, instead of gradio's internal one with the
    server's cache path in it (on the instance, as above)."""
    decode = image.preprocess

    def preprocess(payload: Any) -> Image.Image | None:
        try:
            return decode(payload)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"image: {name} is not an image file, or it is damaged ({type(error).__name__})",
                           print_exception=False) from None  # the user's message; no traceback in the log

    image.preprocess = preprocess








def both_losses_named() -> Any:
    """The loss plot's first value: no points, but both series named. The browser's plot keeps the series of the
    first data it draws, and one first seen in a later update (the training loss after the first validation, or
    the reverse) would never be drawn."""
    import pandas as pd

    return pd.DataFrame([(0, float("nan"), kind) for kind in ("train", "validation")], columns=list(LOSS_COLUMNS))




def adapter_menu(choices: list[Any], **options: Any) -> gr.Dropdown:
    """An adapter menu whose value `Engines.get` checks, not gradio: adapters trained or uploaded since the page
    (or an API client's session) was sent the menu's choices are served too, and an unknown name gets an error
    listing what is served. A custom value is allowed for that, not patched on the instance: gradio builds a
    session's component afresh from its arguments once an update has changed its choices."""
    return gr.Dropdown(choices, allow_custom_value=True, **options)


# Small pictures (the tiny model's scenes are 64 x 64) fill the image box instead of sitting in its middle. On a
# phone, a two-column table's first column (gate scale, layers, adapter) keeps room for its words and numbers: at
# 12% of 390 px a scale of 0.25 broke into "0." and "25" and its header letter by letter. Gradio draws the header
# as a table and the rows as a virtual list of their own, each cell sized inline, so both are set here, alike.
PHONE_COLUMNS = "phone-columns"
CSS = ("#image img { width: 100%; height: 100%; object-fit: contain; } "
       f"@media (max-width: 640px) {{ .{PHONE_COLUMNS} table {{ table-layout: fixed; width: 100% !important; }} "
       f".{PHONE_COLUMNS} :is(th, td, .body-cell):first-child {{ width: 84px !important; min-width: 84px !important; "
       "max-width: 84px !important; } "
       f".{PHONE_COLUMNS} :is(th, td, .body-cell):nth-child(2) {{ width: auto !important; min-width: 0 !important; "
       "max-width: none !important; flex: 1 1 0 !important; } }")


class TrainDefaults(NamedTuple):
    """The Train tab's starting values (train_defaults)."""

    prompt_len: int
    prompt_layers: int
    lr: float
    batch_size: int = 16


def train_defaults(engines: Engines, config: ServeConfig) -> TrainDefaults:
    """The Train tab's starting settings: the tiny text adapter's recipe on the tiny model (it answers a held-out
    scene question right after one epoch of the offered records, about 17 s on 2 cores), else the official v1
    recipe (10 prompt tokens on the top 30 layers, lr 9e-3 x batch / 256)."""
    if serves_tiny(config):
        from adapter.tiny.recipe import RECIPES

        text = RECIPES["full"].text
        return TrainDefaults(text.prompt_len, text.prompt_layers, text.lr)
    return TrainDefaults(10, min(30, engines.default.model.args.n_layers), 9e-3 * 16 / 256)


def train_tab(handlers: Handlers, config: ServeConfig, menus: list[gr.Dropdown]) -> gr.Dropdown:
    """The Train tab: records in, an adapter trained on the served base out, served beside the others (`menus`,
    the adapter menus, offer it at the end). Returns its Start from menu (which lists the served adapters too)."""
    engines = handlers.engines
    start = train_defaults(engines, config)
    sees = any(engine.can_see_images for engine in engines.by_name.values())  # a CLIP tower is served
    images = (", and with the vision mode LLaVA image records with the pictures they name, trained on the served "
              "CLIP tower") if sees else "; text only: no adapter served here sees"
    whose = " to you alone, until this page is closed or reloaded," if handlers.training.trained.private else ""
    gr.Markdown(f"Train an adapter on the served base, here, while the app goes on answering (each step between "
                f"other requests). Its gates start at zero, so it starts as the frozen base; watch them open. When it "
                f"ends it is served as `trained-N` beside the others{whose} and chosen in the adapter menu above, so "
                f"the gate slider moves between the base and what it learnt; the zip holds it for `--adapter`. Stop "
                f"serves what it has learnt so far, and Resume then takes that run on to its end. Records as "
                f"fine-tuning reads them (`{{instruction, input?, output}}`, chat `messages`, plain text: a .txt "
                f"file or `{{text}}` records, trained on every token{images}); one run "
                f"at a time, of at most {handlers.training.max_steps} steps; warm-up over a tenth of the epochs, "
                f"then cosine decay to a twentieth of the learning rate; 5% of the records give the validation loss, "
                f"taken {VALIDATIONS} times over the run (More settings: end the run when it stops falling, and serve "
                f"the adapter of its lowest).")
    with gr.Row():
        with gr.Column():
            data = gr.File(label="Training records (.json, .jsonl, .parquet) or plain text (.txt)",
                           file_types=[".json", ".jsonl", ".parquet", ".txt"], type="filepath", elem_id="train_file")
            pictures = gr.File(label="Pictures of image records (LLaVA layout), named as the records name them",
                               file_count="multiple", file_types=["image"], type="filepath", value=[], height=160,
                               visible=sees, elem_id="train_images")  # [] : API clients may leave it out
        with gr.Column():
            start_from = adapter_menu(
                start_choices(engines.names), value="", elem_id="train_start",
                label="Start from (a served adapter is trained further in its own kind, shape and prompt format; "
                      "one that sees, on its CLIP tower)")
            mode = gr.Radio(TRAIN_MODES + ([VISION_MODE] if sees else []), value="v1", label="What is learnt",
                            elem_id="train_mode")
            epochs = gr.Slider(1, 20, value=1, step=1, label="Epochs", elem_id="train_epochs")
            batch_size = gr.Slider(1, 64, value=start.batch_size, step=1, label="Batch size", elem_id="train_batch")
            lr = gr.Number(start.lr, label="Peak learning rate", elem_id="train_lr")
    for slider in (epochs, batch_size):  # TrainConfig names what is wrong (and the step limit bounds a run)
        range_checked_by_settings(slider)
    with gr.Accordion("More settings", open=False):
        with gr.Row():
            prompt_len = gr.Number(start.prompt_len, precision=0, label="Prompt tokens per layer",
                                   elem_id="train_prompt_len")  # (bounded by LiveTraining: a served one may be more)
            prompt_layers = gr.Number(start.prompt_layers, precision=0, label="Adapted layers (the top ones)",
                                      elem_id="train_prompt_layers")
            lora_rank = gr.Number(8, precision=0, label="LoRA rank (LoRA alone; v2: 0 = none)", minimum=0,
                                  maximum=MAX_LORA_RANK, elem_id="train_lora_rank")
            prompt_format = gr.Dropdown(list(PROMPT_FORMATS), value=engines.default.prompts.name,
                                        label="Prompt format (how records are written)", elem_id="train_format")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="train_seed")
        with gr.Row():
            early_stop = gr.Number(0, precision=0, elem_id="train_early_stop",
                                   label=f"Stop early after N validations in a row without a lower loss (of the "
                                         f"{VALIDATIONS}; 0: never)")
            keep_best = gr.Checkbox(False, label="Serve the best: the adapter of the lowest validation loss, not the "
                                                 "last step's", elem_id="train_keep_best")
    records, image_records = tiny_training_records(config), tiny_training_images(config)
    if records is not None:
        gr.Examples([[str(records), [], "v1"], [str(image_records[0]), image_records[1], "vision"]],
                    inputs=[data, pictures, mode],
                    example_labels=[f"{records.name}: {TINY_TRAINING_RECORDS:,} scenes in words and sums (v1)",
                                    f"{image_records[0].name}: {TINY_TRAINING_IMAGES:,} questions about rendered "
                                    "scenes, with their pictures (vision)"],
                    label="The tiny model's training questions (its held-out ones are in the Score tab)")
    with gr.Row():
        button = gr.Button("Train", variant="primary", elem_id="train")
        stop = gr.Button("Stop (keep what it learnt)", elem_id="train_stop")
        resume = gr.Button("Resume the stopped run", elem_id="train_resume")
    status = gr.Markdown(elem_id="train_status")
    with gr.Row():
        loss = gr.LinePlot(both_losses_named(), x=LOSS_COLUMNS[0], y=LOSS_COLUMNS[1], color=LOSS_COLUMNS[2],
                           label="Loss (response tokens)", elem_id="train_loss")
        gates = gr.LinePlot(x=GATE_COLUMNS[0], y=GATE_COLUMNS[1], color=GATE_COLUMNS[2],
                            label="Zero-init gates opening: mean |effective gate| over heads, per adapted layer",
                            elem_id="train_gates")
    trained = gr.File(label="The trained adapter (a zip of its folder: adapter.json, adapter.safetensors, log.jsonl "
                            "and plots)", interactive=False, elem_id="train_zip")
    inputs = [data, mode, epochs, batch_size, lr, prompt_len, prompt_layers, lora_rank, prompt_format, seed, start_from,
              pictures, keep_best, early_stop]
    outputs = [status, loss, gates, trained, *menus, start_from]
    button.click(handlers.train, inputs, outputs, api_name="train", concurrency_id="train", concurrency_limit=1)
    resume.click(handlers.resume_training, None, outputs, api_name="resume_training", concurrency_id="train",
                 concurrency_limit=1)
    stop.click(handlers.stop_training, None, None, concurrency_id="train_stop", api_visibility="private")
    return start_from


def upload_panel(handlers: Handlers, menus: list[gr.Dropdown]) -> None:
    """The Model tab's upload: an adapter of the user's own, served beside the others (`menus`, the adapter
    menus, offer it and the top one chooses it)."""
    whom = "to you alone, until this page is closed or reloaded" if handlers.uploads.uploaded.private else \
        "to every user"
    gr.Markdown(f"**An adapter of your own**, served on this base beside the others (the last {MAX_UPLOADED} "
                f"uploaded stay served) {whom}: a file in any format `--adapter` reads (ours, the official "
                "releases' `.pth`, litgpt's), or a `.zip` of its folder (ours, a PEFT adaption-prompt or LoRA folder, "
                f"the Train tab's zip); at most {MAX_UPLOAD} uploaded. Or name one for the server to fetch: "
                "`hf:owner/name` (a hub repository, such as a PEFT adapter's) or `official:NAME`, an official "
                f"release ({', '.join(OFFICIAL)}). One with a visual prompt reads the served CLIP tower. Nothing in "
                "it runs: weights only.")
    with gr.Row():
        upload = gr.File(label="Adapter (.safetensors, .pth, .bin, .pt, .zip)",
                         file_types=[".safetensors", ".pth", ".bin", ".pt", ".zip"], type="filepath", height=140,
                         elem_id="upload_adapter", scale=3)
        with gr.Column(scale=2):
            named = gr.Textbox("", label="or its name", placeholder="hf:owner/name or official:NAME", max_lines=1,
                               elem_id="upload_name")
            button = gr.Button("Serve it", elem_id="serve_upload")
    status = gr.Markdown(elem_id="upload_status")
    button.click(handlers.serve_upload, [upload, named], [status, *menus], api_name="serve_adapter",
                 concurrency_id="upload", concurrency_limit=1)


def removal_button(handlers: Handlers, adapter: gr.Dropdown, menus: list[gr.Dropdown]) -> None:
    """Stop serving the chosen adapter, one trained or uploaded here (`menus` lose it)."""
    button = gr.Button("Stop serving the chosen adapter", elem_id="remove_adapter")
    status = gr.Markdown(elem_id="remove_status")
    button.click(handlers.remove_adapter, adapter, [status, *menus], api_name="remove_adapter",
                 concurrency_id="upload", concurrency_limit=1)


def download_panel(handlers: Handlers, adapter: gr.Dropdown) -> None:
    """The Model tab's download: the adapter chosen at the top, in a format other tools read."""
    with gr.Row():
        to = gr.Dropdown(DOWNLOAD_FORMATS, value="native", label="Download the chosen adapter as", scale=2,
                         elem_id="download_format")
        button = gr.Button("Download", elem_id="download", scale=0)
        file = gr.File(label="The adapter", interactive=False, elem_id="download_file", scale=2)
    button.click(handlers.download_adapter, [to, adapter], file, api_name="download_adapter",
                 concurrency_id="download", concurrency_limit=1)


def api_key_panel(handlers: Handlers) -> None:
    """With private adapters and the OpenAI-compatible API: this page's key to its own adapters there."""
    with gr.Row():
        gr.Markdown("**Your adapters through the OpenAI-compatible API** (`/v1` beside this app): requests "
                    "presenting this page's key reach the adapters it trains or uploads, besides everyone's.")
        button = gr.Button("Show my API key", scale=0, elem_id="show_api_key")
    shown = gr.Markdown(elem_id="api_key")
    button.click(handlers.api_key, None, shown, api_name="api_key", queue=False)


def push_panel(handlers: Handlers, adapter: gr.Dropdown) -> None:
    """The Model tab's push: the adapter chosen at the top to a hub repository of the user's, with their token."""
    gr.Markdown("**Push the chosen adapter to the Hugging Face hub**, to a repository of yours (created if needed), "
                "in this project's format with a model card saying what it is and how to serve it (`--adapter "
                "hf:owner/name`), and how it was trained if it was trained here. Your token needs write access; it "
                "is used for this push alone and not kept.")
    with gr.Row():
        repo = gr.Textbox("", label="Repository", placeholder="owner/name", max_lines=1, elem_id="push_repo", scale=2)
        token = gr.Textbox("", label="Your Hugging Face token", type="password", max_lines=1, elem_id="push_token",
                           scale=2)
        private = gr.Checkbox(False, label="Private (a new repository)", elem_id="push_private", scale=1)
        button = gr.Button("Push", elem_id="push", scale=0)
    status = gr.Markdown(elem_id="push_status")
    button.click(handlers.push_adapter, [repo, token, private, adapter], status, api_name="push_adapter",
                 concurrency_id="push", concurrency_limit=2)  # uploads wait on the network, not on the device


def offer_chat_examples(messages: list[str], box: gr.Textbox) -> None:
    """Clickable held-out questions under a text box (none for models other than the tiny one)."""
    if messages:
        gr.Examples([[m] for m in messages], inputs=[box], label="Held-out scenes and questions")


class SweepPanel(NamedTuple):
    """The gate sweep's scales box, its buttons (answers, next token, layer sweep) and what they fill."""

    scales: gr.Textbox
    sweep: gr.Button
    answers: gr.Dataframe
    next_token: gr.Button
    next_panel: gr.Column  # hidden until first asked
    next_tokens: gr.Dataframe
    next_plot: gr.Plot
    layer_sweep: gr.Button
    layer_answers: gr.Dataframe  # hidden until first asked


def sweep_panel(what: str, prefix: str = "") -> SweepPanel:
    """The gate sweep (element ids `{prefix}sweep...`, `{prefix}next_token...`, `{prefix}layer_sweep...`): the
    answers at each scale, the next token's probabilities at each scale, and the answers with the top N layers."""
    gr.Markdown(f"**Gate sweep**: {what} at up to {MAX_SWEEP} gate scales (the delta scale and sampling from the "
                "controls above), decoded together in one batch. **Next token**: how likely each scale finds the "
                f"first token of the answer (each scale's {NEXT_TOKENS_TOP_K} likeliest, at temperature 1): which "
                "tokens the adaption prompts make likelier. **Layer sweep**: the same at the slider's gate scale with "
                "only the top N adapter layers' prompts speaking, from none to all: how many layers it takes.")
    with gr.Row():
        scales = gr.Textbox(SWEEP, label="Gate scales", scale=3, elem_id=f"{prefix}sweep_scales")
        button = gr.Button("Sweep", variant="primary", scale=1, elem_id=f"{prefix}sweep")
        next_button = gr.Button("Next token", scale=1, elem_id=f"{prefix}next_token")
        layer_button = gr.Button("Layer sweep", scale=1, elem_id=f"{prefix}layer_sweep")
    rows = gr.Dataframe(headers=["gate scale", "answer"], datatype=["number", "str"], column_widths=["12%", "88%"],
                        interactive=False, wrap=True, elem_id=f"{prefix}sweep_table", elem_classes=[PHONE_COLUMNS])
    with gr.Column(visible=False, elem_id=f"{prefix}next_token_panel") as next_panel:
        next_rows = gr.Dataframe(headers=["token"], interactive=False, label="Next token, % at each gate scale",
                                 elem_id=f"{prefix}next_token_table")
        next_plot = gr.Plot(label="Next token against the gate scale", elem_id=f"{prefix}next_token_plot")
    layer_rows = gr.Dataframe(headers=["adapter layers speaking", "answer"], datatype=["str", "str"],
                              column_widths=["20%", "80%"], interactive=False, wrap=True, visible=False,
                              label="Layer sweep", elem_id=f"{prefix}layer_sweep_table", elem_classes=[PHONE_COLUMNS])
    next_button.click(lambda: gr.Column(visible=True), None, next_panel, queue=False, api_visibility="private")
    layer_button.click(lambda: gr.Dataframe(visible=True), None, layer_rows, queue=False, api_visibility="private")
    return SweepPanel(scales, button, rows, next_button, next_panel, next_rows, next_plot, layer_button, layer_rows)


def adapter_choice(engines: Engines, value: str, label: str, elem_id: str) -> gr.Dropdown:
    """Which served adapter answers; shown only when there is more than one."""
    return adapter_menu(engines.names, value=value, label=label, visible=len(engines.names) > 1, elem_id=elem_id)


def build_demo(engines: Engines, config: ServeConfig) -> gr.Blocks:
    """The Blocks UI; model work is queued under one concurrency id, so --concurrency bounds all of it."""
    def make_engine(model: Transformer) -> Engine:  # an adapter added while serving, wrapped as the others
        return engine_for(model, engines.default.lock, config)

    private = config.private_adapters
    training = None if config.no_train_tab else LiveTraining(engines, make_engine, private=private,
                                                             max_steps=config.train_max_steps)
    uploads = None if config.no_upload else AdapterUploads(engines, make_engine, private=private)
    handlers = Handlers(engines, training, uploads)
    image_examples, chat_examples = examples(config)
    model_events = {"concurrency_id": "model", "concurrency_limit": config.concurrency}
    with gr.Blocks(title="LLaMA-Adapter", analytics_enabled=False) as demo:  # (its cache: sweep_by_age)
        gr.Markdown("# LLaMA-Adapter\nA frozen LLaMA with zero-init gated adaption prompts. The **gate scale** "
                    "sets how much the adapter speaks for the next answer: 0 is the frozen base, 1 the trained "
                    "adapter, above 1 exaggerated.")
        with gr.Row():
            gate = gr.Slider(0, MAX_SCALE, value=config.gate_scale, step=0.05,
                             label=gate_label(engines.get(engines.names[0])), elem_id="gate",
                             scale=3)
            layers = gr.Textbox("all", label="Adapter layers speaking ('all', 'top N', '28-31', heads '31:0-3'; "
                                "the others silent)", elem_id="gate_layers", scale=1)
            adapter = adapter_choice(engines, engines.names[0], "Adapter (chat, compare, gates, model)", "adapter")
        with gr.Accordion("Advanced", open=False):
            delta = gr.Slider(0, MAX_SCALE, value=config.delta_scale, step=0.05,
                              label="Delta scale (v2 biases, scales, LoRA, norms)", elem_id="delta")
            temperature = gr.Slider(0, MAX_TEMPERATURE, value=DEFAULTS.temperature, step=0.05,
                                    label="Temperature (0 = greedy)", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="Top-p", elem_id="top_p")
            max_new = gr.Slider(1, config.max_new_tokens, value=min(DEFAULTS.max_new_tokens, config.max_new_tokens),
                                step=1, label="Max new tokens", elem_id="max_new_tokens")
            seed = gr.Number(DEFAULTS.seed, precision=0, label="Seed (same seed and question: only the gate "
                             "changes the answer)", elem_id="seed")
            system = gr.Textbox(config.system, lines=2, elem_id="system",
                                label="System prompt (the Llama 2 and Llama 3 chat formats; Alpaca has none)")
        for slider in (gate, delta, temperature, top_p, max_new):
            range_checked_by_settings(slider)
        controls = [gate, delta, temperature, top_p, max_new, seed, adapter, system, layers]

        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
            message = gr.Textbox(label="Message", placeholder="Ask something and press Enter", elem_id="message")
            offer_chat_examples(chat_examples, message)
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send", min_width=BUTTON_WIDTH)
                stop = gr.Button("Stop", elem_id="stop", min_width=BUTTON_WIDTH)
                retry = gr.Button("Retry", elem_id="retry", min_width=BUTTON_WIDTH)
                undo = gr.Button("Undo", elem_id="undo", min_width=BUTTON_WIDTH)
                clear = gr.Button("Clear", elem_id="clear", min_width=BUTTON_WIDTH)
            with gr.Accordion("Save this conversation as a training record", open=False):
                gr.Markdown("One record in the chat `messages` layout (the system prompt first, if set): correct "
                            "the answers you want otherwise, then train on it in the Train tab (or with `python -m "
                            "adapter.finetune --data`), alone or beside others.")
                save = gr.Button("Save", elem_id="save_conversation")
                saved = gr.File(label="conversation.jsonl", interactive=False, elem_id="conversation_file")
            chat_colours = gr.HighlightedText(label="Last answer: share of attention through the adaption "
                                              "prompts per token (0 to 1: the deeper, the more)",
                                              elem_id="chat_colours")
            chat_layers = gr.Plot(label="Last answer: share through the prompts per adapter layer",
                                  elem_id="chat_layers")
        with gr.Tab("Image"):
            if not engines.get(engines.for_images).can_see_images:
                gr.Markdown("**This adapter cannot see images**: it has no visual prompt or no CLIP tower "
                            "(--clip), so answers come from the question alone.")
            with gr.Row():
                # image_mode None: the picture as uploaded, made RGB as everywhere else (transparency on white,
                # 16-bit scaled: adapter.images.to_rgb), not by gradio's own convert("RGB")
                image = gr.Image(type="pil", image_mode=None, label="Image", height=320, elem_id="image",
                                 sources=["upload", "webcam", "clipboard"])
                clear_image_errors(image)
                with gr.Column():
                    image_adapter = adapter_choice(engines, engines.for_images, "Adapter", "image_adapter")
                    image_controls = [*controls[:6], image_adapter, system, layers]
                    first = image_examples[0][1] if image_examples else EXAMPLE_QUESTION
                    question = gr.Textbox(label="Question", value=first, elem_id="image_question")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="ask", min_width=BUTTON_WIDTH)
                        image_stop = gr.Button("Stop", min_width=BUTTON_WIDTH)
                        image_clear = gr.Button("Clear", elem_id="image_clear", min_width=BUTTON_WIDTH)
                    answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="image_answer")
                    conversation = gr.Chatbot(label="Earlier turns about this picture: a new question follows them "
                                              "(the same question again is answered again); a new picture or Clear "
                                              "starts over", height=220, elem_id="image_chat")
                    asked_question = gr.State("")
                    with gr.Accordion("Save this conversation as a training record", open=False):
                        gr.Markdown("The picture and one LLaVA record of the turns about it (the system prompt "
                                    "first, if set), zipped: correct the answers you want otherwise, then train on "
                                    "both with the Train tab's vision mode (or `python -m adapter.finetune --data "
                                    "conversation.jsonl --image-folder .`).")
                        image_save = gr.Button("Save", elem_id="save_image_conversation")
                        image_saved = gr.File(label="conversation.zip", interactive=False,
                                              elem_id="image_conversation_file")
                    image_colours = gr.HighlightedText(label="Share of attention through the adaption prompts per "
                                                       "token (0 to 1: the deeper, the more)",
                                                       elem_id="image_colours")
                    image_layers = gr.Plot(label="Share through the prompts per adapter layer",
                                           elem_id="image_layers")
            if image_examples:
                gr.Examples(image_examples, inputs=[image, question])
            image_panel = sweep_panel("the same picture and question", prefix="image_")
        with gr.Tab("Compare"):
            gr.Markdown("One click answers at gate 0 (the frozen base) and at the slider's scale, decoded "
                        "together in one batch.")
            compare_question = gr.Textbox(label="Question", elem_id="compare_question")
            offer_chat_examples(chat_examples, compare_question)
            with gr.Row():
                compare_button = gr.Button("Compare", variant="primary", elem_id="compare", min_width=BUTTON_WIDTH)
                compare_stop = gr.Button("Stop", min_width=BUTTON_WIDTH)
            with gr.Row():
                base_answer = gr.Textbox(label="Frozen base (gate 0)", lines=6, interactive=False,
                                         elem_id="base_answer")
                adapted_answer = gr.Textbox(label="Adapter (gate slider)", lines=6, interactive=False,
                                            elem_id="adapted_answer")
            with gr.Row():
                every_button = gr.Button("Ask every adapter", scale=0, elem_id="every_adapter")
                gr.Markdown("The same question to each adapter served here in turn, each in its own prompt format, at "
                            "the settings above: what each learnt to make of it.")
            every_answers = gr.Dataframe(headers=["adapter", "answer"], datatype=["str", "str"],
                                         column_widths=["20%", "80%"], interactive=False, wrap=True,
                                         elem_id="every_adapter_table", elem_classes=[PHONE_COLUMNS])
            panel = sweep_panel("the same question")
        with gr.Tab("Score"):
            gr.Markdown(f"Held-out records (a JSON list or JSONL of `{{instruction, input?, output}}`, or LLaVA "
                        f"image records with their pictures, as fine-tuning reads them; the first {MAX_SCORE_RECORDS}) "
                        "scored at each gate scale: the loss of the reference answers' tokens, the share of them the "
                        "model ranks first and, when asked, how many greedy answers equal the reference. The delta "
                        "scale comes from Advanced; image records need an adapter that sees (the adapter menu at "
                        "the top). Multiple-choice records (`{question, choices, answer}`, MMLU's, ARC's) are "
                        "scored by which choice the model finds likeliest as its answer. Plain text (a .txt file, "
                        f"or records of `{{text}}`; its first {MAX_SCORE_TOKENS:,} tokens) is scored by its "
                        "perplexity: what the adapter does to the base's own language modelling.")
            with gr.Row():
                score_file = gr.File(label="Records (.json, .jsonl, .parquet) or plain text (.txt)",
                                     file_types=[".json", ".jsonl", ".parquet", ".txt"], type="filepath",
                                     elem_id="score_file")
                score_images = gr.File(label="Pictures of image records (LLaVA layout), named as the records name "
                                       "them", file_count="multiple", file_types=["image"], type="filepath",
                                       value=[], elem_id="score_images")  # [] : API clients may leave it out
            held_out_files, held_out_images = tiny_held_out(config), tiny_held_out_images(config)
            if held_out_files is not None:
                gr.Examples([[str(held_out_files[0]), None], [str(held_out_images[0]), held_out_images[1]],
                             [str(held_out_files[1]), None], [str(held_out_files[2]), None]],
                            inputs=[score_file, score_images],
                            label="The tiny model's held-out questions (text; image, for its image adapter; "
                                  "multiple-choice) and held-out plain text of its base's corpus")
            with gr.Row():
                score_scales = gr.Textbox(SWEEP, label="Gate scales", scale=3, elem_id="score_scales")
                score_exact = gr.Checkbox(False, label="Exact answers (decodes every record at every scale)",
                                          elem_id="score_exact")
                score_button = gr.Button("Score", variant="primary", scale=1, elem_id="score")
            score_table = gr.Dataframe(headers=SCORE_HEADERS, interactive=False, elem_id="score_table")
            score_plot = gr.Plot(label="Loss and accuracy against the gate scale", elem_id="score_plot")
        menus = [adapter, image_adapter]
        if training is not None:
            with gr.Tab("Train"):
                menus.append(train_tab(handlers, config, menus[:2]))
        with gr.Tab("Gates"):
            heatmap = gr.Plot(label="Effective gates (layer x head) at the slider's scale, only the layers chosen "
                                    "above speaking")
            plot = engines.default.training_plot()
            training = gr.Image(picture(plot), label="Gates opening during training (gates.png)", interactive=False,
                                visible=plot is not None, elem_id="training_gates")
        with gr.Tab("Model"):
            info = gr.JSON(label="Loaded", elem_id="model_info")
            with gr.Row():
                refresh = gr.Button("Refresh", elem_id="refresh")
                if handlers.uploads is not None or handlers.training is not None:
                    removal_button(handlers, adapter, menus)
            download_panel(handlers, adapter)
            if not config.no_push:
                push_panel(handlers, adapter)
            if config.private_adapters and config.openai_api:
                api_key_panel(handlers)
            if handlers.uploads is not None:
                upload_panel(handlers, menus)

        # /chat for API clients, on a button never shown: the page's Send empties the box first (gradio runs
        # one trigger's events one after another, so emptying it beside the answer waited for the answer's end)
        # and gives the question back where it is refused
        api_chat = gr.Button(visible=False, elem_id="api_chat")
        api_chat.click(handlers.chat, [message, chatbot, *controls], chatbot, api_name="chat", **model_events)
        asked = gr.State("")
        sent = []
        for trigger in (send.click, message.submit):
            taken = trigger(lambda text: ("", text), message, [message, asked], queue=False, api_visibility="private")
            sent.append(taken.then(handlers.chat, [asked, chatbot, *controls], chatbot, api_visibility="private",
                                   **model_events))
            sent[-1].failure(handlers.give_back, [asked, message, chatbot], message, queue=False,
                             api_visibility="private")
        retried = retry.click(handlers.retry, [chatbot, *controls], chatbot, api_visibility="private", **model_events)
        answering = [*sent, retried]
        answering += [event.success(handlers.chat_shares, [chatbot, *controls], [chat_colours, chat_layers],
                                    api_visibility="private", **model_events) for event in answering]
        no_shares = ([], None)  # the colours and bars of an answer no longer shown
        # Stop, Undo and Clear stop the answer being written first (it went on streaming into the cleared chat)
        stop.click(None, cancels=answering).then(lambda: no_shares, None, [chat_colours, chat_layers], queue=False,
                                                 api_visibility="private")
        undo.click(None, cancels=answering).then(handlers.undo, chatbot, [chatbot, message], queue=False,
                                                 api_visibility="private").then(
            lambda: no_shares, None, [chat_colours, chat_layers], queue=False, api_visibility="private")
        save.click(handlers.save_conversation, [chatbot, system], saved, api_name="save_conversation")
        image_save.click(handlers.save_image_conversation, [image, asked_question, answer, conversation, system],
                         image_saved, api_visibility="private")  # the question asked: the page's
        clear.click(None, cancels=answering).then(lambda: ([], "", "", *no_shares), None,
                                                  [chatbot, message, asked, chat_colours, chat_layers], queue=False,
                                                  api_visibility="private")  # (nothing to give back after it)
        chatbot.clear(None, cancels=answering).then(lambda: no_shares, None, [chat_colours, chat_layers],
                                                    queue=False, api_visibility="private")  # its own trash icon

        turned = gr.on([ask.click, question.submit], handlers.next_image_turn,  # Enter asks too
                       [asked_question, answer, conversation, question], [conversation, answer, asked_question],
                       queue=False, api_visibility="private")
        asked = turned.then(handlers.ask_image, [image, question, *image_controls, conversation], answer,
                            api_name="image", **model_events)
        asked.success(handlers.image_shares, [image, question, answer, *image_controls, conversation],
                      [image_colours, image_layers], api_visibility="private", **model_events)
        image_inputs = [image, question, image_panel.scales, *image_controls, conversation]
        image_swept = image_panel.sweep.click(handlers.sweep_image, image_inputs, image_panel.answers,
                                              api_name="image_sweep", **model_events)
        image_panel.next_token.click(handlers.next_tokens_image, image_inputs,
                                     [image_panel.next_tokens, image_panel.next_plot], api_name="image_next_tokens",
                                     **model_events)
        image_layers_swept = image_panel.layer_sweep.click(handlers.layer_sweep_image,
                                                           [image, question, *image_controls, conversation],
                                                           image_panel.layer_answers, api_name="image_layer_sweep",
                                                           **model_events)
        image_stop.click(None, cancels=[asked, image_swept, image_layers_swept])
        for starts_over in (image.change, image_clear.click):  # what was being answered stops first
            stopped = starts_over(None, cancels=[asked, image_swept, image_layers_swept])
            stopped.then(lambda: ([], "", "", [], None), None,
                         [conversation, answer, asked_question, image_colours, image_layers], queue=False,
                         api_visibility="private")

        compared = compare_button.click(handlers.compare, [compare_question, *controls], [base_answer, adapted_answer],
                                        api_name="compare", **model_events)
        swept = panel.sweep.click(handlers.sweep, [compare_question, panel.scales, *controls], panel.answers,
                                  api_name="sweep", **model_events)
        panel.next_token.click(handlers.next_tokens, [compare_question, panel.scales, *controls],
                               [panel.next_tokens, panel.next_plot], api_name="next_tokens", **model_events)
        layers_swept = panel.layer_sweep.click(handlers.layer_sweep, [compare_question, *controls],
                                               panel.layer_answers, api_name="layer_sweep", **model_events)
        everyone = every_button.click(handlers.every_adapter, [compare_question, *controls], every_answers,
                                      api_name="every_adapter", **model_events)
        compare_stop.click(None, cancels=[compared, swept, layers_swept, everyone])
        score_inputs = [score_file, score_scales, score_exact, *controls[:-1], score_images, layers]
        score_button.click(handlers.score, score_inputs, [score_table, score_plot], api_name="score", **model_events)

        # the named endpoints first: a private event of the same function would take the function's name
        gate.change(handlers.gates, [gate, adapter, layers], heatmap, api_name="gates", trigger_mode="always_last")
        refresh.click(handlers.model_info, adapter, info, api_name="model_info")
        # the first to fail (an adapter not served, typed in) ends the chain: one message, not four
        adapter.change(handlers.gates, [gate, adapter, layers], heatmap, api_visibility="private").success(
            handlers.training_plot, adapter, training, api_visibility="private").success(
            handlers.gate_slider, adapter, gate, api_visibility="private").success(
            handlers.model_info, adapter, info, api_visibility="private")
        for chosen in (layers.submit, layers.blur):
            chosen(handlers.gates, [gate, adapter, layers], heatmap, api_visibility="private")
        demo.load(handlers.gates, [gate, adapter, layers], heatmap, api_visibility="private")
        demo.load(handlers.model_info, adapter, info, api_visibility="private")
        demo.load(handlers.adapter_menus, None, menus, api_visibility="private")
        demo.unload(handlers.forget_session)  # (public too: a session's stopped run was kept for good)
    demo.queue(max_size=QUEUE_PER_WORKER * config.concurrency, default_concurrency_limit=config.concurrency)
    return demo


def serve(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, *,
          block: bool = True) -> tuple[gr.Blocks, Engines]:
    """Check the flags, load the model, launch. With block=False it returns at once, the app running (tests)."""
    config = parse_config(argv, environ)
    check_listening(config.host, config.port, ipv6=False)
    engines = load_engines(config)
    demo = build_demo(engines, config)
    demo.launch(server_name=config.host, server_port=config.port, share=config.share, show_error=True,
                auth=None if config.login is None else [config.login],
                prevent_thread_lock=True, allowed_paths=example_images(), max_file_size=MAX_UPLOAD,
                run_history=False, quiet=not block, css=CSS, state_session_capacity=config.max_sessions)
    sweep_by_age(demo)  # uploads and gradio's copies of downloads, older than four hours
    if config.openai_api:  # on the server just started, beside the app's own routes
        from adapter.openai_api import api_router

        demo.app.include_router(api_router(engines, config.api_key))
    if block:
        with terminated_raises():  # SIGTERM (docker stop, systemd, a Space restarting) as Ctrl-C: the server
            demo.block_thread()    # closes and the process ends normally, removing what it kept on disk
    return demo, engines


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    try:
        serve(argv)
    except (ValueError, OSError) as error:  # bad flags, missing files, a port in use
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
