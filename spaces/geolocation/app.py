"""Gradio Space: where was this photo taken? Geolocate an image or a description with GeoCLIP or GeoHier.

Models: `GEOLOC_MODEL` (comma-separated Hub ids or folders; several give a model dropdown), else the bundled
demo model, else a random tiny one (see `geoloc.space.load_geolocators`). Serves on `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT` (default 127.0.0.1:7860). Programs call `/geolocate_image` (image, top_k) and
`/geolocate_text` (text, top_k) with `gradio_client`; both return (table, map, scene, attention).
"""

import csv
from pathlib import Path

import gradio as gr

from geoloc.space import (
    MAX_TEXT_CHARS,
    MAX_TOP_K,
    load_geolocators,
    locate_image,
    locate_text,
    prediction_table,
    world_map,
)
from modeling_geoclip import load_image

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_FILE_SIZE = "10mb"
CONCURRENCY_LIMIT = 2  # model calls at a time; the rest wait in the queue
QUEUE_SIZE = 64
TEXT_EXAMPLES = [
    "a beach with palm trees and volcanic rock",
    "snowy mountains above a glacier lake",
    "red sand dunes in a hot desert",
]

_LOADED, MODEL_NOTE = load_geolocators()
GEOLOCATORS = {geolocator.name: geolocator for geolocator in _LOADED}


class CheckedImage(gr.Image):
    """`gr.Image` whose uploads are decoded by `modeling_geoclip.load_image` (any mode, EXIF rotation): a file
    that is not an image, is corrupt or is too large gets a readable message instead of a server error."""

    is_template = True  # drawn by gr.Image's frontend

    def preprocess(self, payload):
        if payload is None:
            return None
        try:
            return load_image(payload.path)
        except ValueError as error:
            raise gr.Error(str(error).replace(payload.path, payload.orig_name or "the upload")) from None


def _answer(run, model_name: str):
    """Run one query and lay it out: (top-k table, map, scene probabilities, attention overlays)."""
    try:
        result = run(GEOLOCATORS[model_name])
    except ValueError as error:
        raise gr.Error(str(error)) from None
    table = prediction_table(result)
    labels = (table["nearest place"] + ", " + table["country"]).tolist()
    attention = [(level.overlay, level.caption) for level in result.attention or []]
    return table, world_map(result, labels), result.scenes, attention


def geolocate_image(image, top_k: int, model_name: str):
    """Geolocate a photo: the top-k places with latitude, longitude, probability and nearest place."""
    if image is None:
        raise gr.Error("Add an image first: upload one, take one with the webcam, paste one or pick an example.")
    return _answer(lambda geolocator: locate_image(geolocator, image, top_k), model_name)


def geolocate_text(text: str, top_k: int, model_name: str):
    """Geolocate a description (e.g. "a beach with palm trees and volcanic rock"): the top-k places."""
    return _answer(lambda geolocator: locate_text(geolocator, text, top_k), model_name)


def banner() -> str:
    """Which model(s) this page runs, and a plain warning when it is a demo or random model."""
    lines = [f"**Model{'s' if len(GEOLOCATORS) > 1 else ''}:** " + ", ".join(f"`{n}`" for n in GEOLOCATORS)]
    lines += [f"⚠️ {MODEL_NOTE}"] if MODEL_NOTE else []
    return "\n\n".join(lines)


def read_examples() -> tuple[list[list[str]], list[str]]:
    """The bundled example images and their labels with true coordinates (`examples/examples.csv`)."""
    with open(EXAMPLES_DIR / "examples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = [f"{row['label']} ({row['latitude']}, {row['longitude']})" for row in rows]
    return [[str(EXAMPLES_DIR / row["file"])] for row in rows], labels


with gr.Blocks(title="geoloc: where is this?") as demo:
    gr.Markdown("# Where is this?\nGeolocate a photo or a description of a place: the most probable "
                "places on a world map and in a table.")
    gr.Markdown(banner(), elem_id="model-banner")
    with gr.Row():
        model = gr.Dropdown(list(GEOLOCATORS), value=next(iter(GEOLOCATORS)), label="Model",
                            visible=len(GEOLOCATORS) > 1)
        top_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, precision=0, label="Places to show (top-k)")
    with gr.Row():
        with gr.Column():
            with gr.Tab("Image"):
                image = CheckedImage(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                     label="Photo", height=320)
                image_button = gr.Button("Geolocate image", variant="primary")
                example_images, example_labels = read_examples()
                image_examples = gr.Examples(example_images, inputs=[image], example_labels=example_labels,
                                             label="Examples (crops of a Natural Earth map)", cache_examples=False,
                                             api_visibility="private")
            with gr.Tab("Text"):
                text = gr.Textbox(label="Description", placeholder=TEXT_EXAMPLES[0], max_length=MAX_TEXT_CHARS)
                text_button = gr.Button("Geolocate text", variant="primary")
                text_examples = gr.Examples([[t] for t in TEXT_EXAMPLES], inputs=[text], cache_examples=False,
                                            api_visibility="private")
            with gr.Group(visible=any(g.capabilities.attention for g in GEOLOCATORS.values())):
                scene = gr.Label(label="Scene (GeoHier models)", num_top_classes=3)
                attention = gr.Gallery(label="Where the model looked, per hierarchy level (GeoHier models)",
                                       columns=3)
        with gr.Column():
            world = gr.Plot(label="Top-k places (hover for details) and probability", elem_id="world-map")
            table = gr.Dataframe(label="Top-k places", elem_id="top-k-table", buttons=["copy"],
                                 interactive=False, wrap=True)
    outputs = [table, world, scene, attention]
    image_inputs, text_inputs = [image, top_k, model], [text, top_k, model]
    image_button.click(geolocate_image, image_inputs, outputs, api_name="geolocate_image")
    text_button.click(geolocate_text, text_inputs, outputs, api_name="geolocate_text")
    text.submit(geolocate_text, text_inputs, outputs, api_visibility="private")
    image_examples.load_input_event.then(geolocate_image, image_inputs, outputs, api_visibility="private")
    text_examples.load_input_event.then(geolocate_text, text_inputs, outputs, api_visibility="private")

demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    demo.launch(max_file_size=MAX_FILE_SIZE)
