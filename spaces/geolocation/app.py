"""Gradio Space: where was this photo taken? Geolocate an image or a description with GeoCLIP or GeoHier.

Models: `GEOLOC_MODEL` (comma-separated Hub ids or folders; several give a model menu), else the bundled demo
model, else a random tiny one (`answers.load_geolocators`). Serves on `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`
(default 127.0.0.1:7860). Programs call `/geolocate_image` (image, top_k, model_name) and `/geolocate_text`
(text, top_k, model_name) with `gradio_client`; both return the answer as JSON (`answers.Answer.to_json`).

The page: a photo, a description or an example in; the answer in words, on a map and in a table out
(`page.py`). A share link reproduces an answer (`?example=...`, `?text=...`, or `?shared=ID` for an uploaded
photo: its answer only, kept in memory while the Space runs; the photo itself is never shared and the page says
so); an error leaves the previous answer in place. Requests wait their turn fairly: at most `MODEL_SLOTS` model
calls run at once, one per browser session or API client, and waiting clients are served in turn (a client with
many requests waits for its own, never holds the others up); a client may have at most `MAX_WAITING` requests
waiting. Uploads are deleted after `GEOLOC_SPACE_FILE_LIFETIME` seconds (default 900). The model menu sits at
the top with the selected model's caveat; switching model answers the last query again with the new model (or
clears the answer when it cannot).
"""

import csv
import dataclasses
import html
import os
import secrets
import threading
import urllib.parse
from collections import OrderedDict, deque
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from answers import MAX_TEXT_CHARS, MAX_TOP_K, Truth, load_geolocators, locate, model_note
from geoloc.data.dataset import image_limits
from geo_core import load_image
from page import CSS, EMPTY_SUMMARY, details_html, empty_map, insight_html, static_folder, summary_html, world_map
from page import line_traces as page_lines

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_FILE_SIZE = "10mb"
MODEL_SLOTS = 2  # model calls at a time (`FairTurns`); the rest wait their turn
WORKERS = 24  # requests Gradio hands to the app at once: they wait in `FairTurns`, where turns are fair
MAX_WAITING = 16  # requests one client may have waiting at once (more are refused with a message)
QUEUE_SIZE = 64
DEFAULT_TOP_K = 5
FILE_LIFETIME_S = int(os.environ.get("GEOLOC_SPACE_FILE_LIFETIME", "900"))  # uploads are deleted after this
SHARED_ANSWERS = 256  # answers of uploaded photos kept for share links (the oldest are forgotten)
BUSY_MESSAGE = (f"Too many requests at once from this client ({MAX_WAITING} are already waiting): wait for "
                "their answers, then send more.")
SHARED_PHOTO_QUERY = "a photo whose answer was shared (the photo itself is not shared)"
SHARE_NOTE = ("The share link shows this answer, not your photo (it is not stored); links are kept while the "
              "Space runs, for the newest {count} answers.")
TEXT_EXAMPLES = [
    "a beach with palm trees and volcanic rock",
    "snowy mountains above a glacier lake",
    "red sand dunes in a hot desert",
]

GEOLOCATORS, MODEL_NOTE = load_geolocators()  # MODEL_NOTE: the default model's caveat (`model_note`)
DEFAULT_MODEL_NAME = next(iter(GEOLOCATORS))
# text mode only for models whose text queries mean something (a declared capability, not the tower's presence)
READS_TEXT = {name: geolocator.capabilities.text and geolocator.capabilities.text_aligned
              for name, geolocator in GEOLOCATORS.items()}
# Uploads are decoded once, within the limits of every served model's image processor (pixels and resize).
_LIMITS = [image_limits(geolocator.image_processor) for geolocator in GEOLOCATORS.values()]
UPLOAD_LIMITS = {"max_pixels": min(limits["max_pixels"] for limits in _LIMITS),
                 "resize_edge": max((limits["resize_edge"] or 0 for limits in _LIMITS), default=0) or None}


def read_examples() -> dict[str, tuple[Path, Truth]]:
    """The bundled example images by key ("alps"), with their true locations (`examples/examples.csv`)."""
    with open(EXAMPLES_DIR / "examples.csv", newline="") as handle:
        return {Path(row["file"]).stem: (EXAMPLES_DIR / row["file"],
                                         Truth(row["label"], float(row["latitude"]), float(row["longitude"])))
                for row in csv.DictReader(handle)}


EXAMPLES = read_examples()


# ------------------------------------------------------------------------------------ checked inputs
def readable_error(message: str) -> gr.Error:
    """An error the visitor reads; the server log gets no traceback for it. Gradio shows the message as HTML,
    and it may echo a visitor's input (a share link's `?example=`, a file name): escaped, so none renders."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)  # element text: < > & suffice


def decode_upload(path: str, shown_name: str | None):
    """An uploaded file as an RGB PIL image, or a readable error that names the file as the visitor knows it."""
    try:
        return load_image(path, **UPLOAD_LIMITS)
    except ValueError as error:
        raise readable_error(str(error).replace(path, shown_name or "the upload")) from None


def parse_top_k(value) -> int:
    """`top_k` from the page or an API call: a whole number from 1 to `MAX_TOP_K` (also as text, e.g. "5")."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or not 1 <= number <= MAX_TOP_K:
        raise readable_error(f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {value!r}.")
    return int(number)


def parse_model(value) -> str:
    """A model name from the page or an API call: one the page offers (empty: the default)."""
    if value is None or value == "":
        return DEFAULT_MODEL_NAME
    if value not in GEOLOCATORS:
        raise readable_error(f"Unknown model {value!r}: choose one of {', '.join(map(repr, GEOLOCATORS))}.")
    return value


class CheckedImage(gr.Image):
    """`gr.Image` whose uploads are decoded by `geo_core.load_image` (any mode, EXIF rotation): a file
    that is not an image, is corrupt or is too large gets a readable message instead of a server error."""

    is_template = True  # drawn by gr.Image's frontend

    def preprocess(self, payload):
        return None if payload is None else decode_upload(payload.path, payload.orig_name)


class TopK(gr.Slider):
    """The top-k slider; a bad value from an API call (text, empty, out of range) gets a readable message."""

    is_template = True

    def preprocess(self, payload):
        return parse_top_k(payload)


class ModelChoice(gr.Dropdown):
    """The model menu; an unknown model name from an API call gets a readable message (not a traceback)."""

    is_template = True

    def preprocess(self, payload):
        return parse_model(payload)


# ------------------------------------------------------------------------------------------ answering
class FairTurns:
    """At most `slots` model calls at a time, at most one per browser session or API client; waiting calls are
    served one client at a time in turn (round robin), so that a client with many requests queues behind its own
    requests only, and never holds the others up. A client with `max_waiting` requests waiting gets more
    refused with a message."""

    def __init__(self, slots: int, max_waiting: int):
        self.slots, self.max_waiting = slots, max_waiting
        self._changed = threading.Condition()
        self._waiting: OrderedDict[object, deque] = OrderedDict()  # client -> its waiting tickets, in turn order
        self._running: set = set()

    def _next(self):
        """The ticket whose turn it is: the first waiting client (in turn order) with no call running."""
        if len(self._running) >= self.slots:
            return None
        return next((tickets[0] for client, tickets in self._waiting.items() if client not in self._running),
                    None)

    @contextmanager
    def __call__(self, request: gr.Request | None):
        client = getattr(request, "session_hash", None) or object()  # no session: a client of its own
        ticket = object()
        with self._changed:
            tickets = self._waiting.setdefault(client, deque())
            if len(tickets) >= self.max_waiting:
                raise readable_error(BUSY_MESSAGE)
            tickets.append(ticket)
            while self._next() is not ticket:
                self._changed.wait()
            tickets.popleft()
            del self._waiting[client]
            if tickets:  # its next request waits at the back of the turn order
                self._waiting[client] = tickets
            self._running.add(client)
        try:
            yield
        finally:
            with self._changed:
                self._running.discard(client)
                self._changed.notify_all()


FAIR_TURNS = FairTurns(MODEL_SLOTS, MAX_WAITING)
SHARED: OrderedDict[str, tuple] = OrderedDict()
SHARED_LOCK = threading.Lock()


def answer_for(request, model_name: str, top_k: int, **query):
    """Ask the model (in fair turns); a bad input becomes a readable error."""
    with FAIR_TURNS(request):
        try:
            return locate(GEOLOCATORS[model_name], top_k=top_k, **query)
        except ValueError as error:
            raise readable_error(str(error)) from None


def render(answer, share_query: str, share_note: str = "") -> tuple:
    """The page's outputs for an answer: (summary, map, details, insight)."""
    geolocator = GEOLOCATORS[answer.model]
    return (summary_html(answer), world_map(answer, answer.cells), details_html(answer, share_query, share_note),
            insight_html(answer, geolocator.capabilities.scenes))


def share_query(model_name: str, top_k: int, **fields) -> str:
    """The URL query that reproduces an answer (the model only when it is not the default)."""
    if model_name != DEFAULT_MODEL_NAME:
        fields["model"] = model_name
    return urllib.parse.urlencode({**fields, "k": top_k})


def locate_photo(image, top_k: int, model_name: str, request: gr.Request):
    """The Locate button and uploads: the answer for the photo in the image box. The rendered answer is kept
    in memory under a random id (the newest `SHARED_ANSWERS`), which its share link names."""
    if image is None:
        raise readable_error("Add a photo first: upload one, take one with the webcam, paste one or pick an example.")
    answer = answer_for(request, model_name, top_k, image=image)
    share_id = secrets.token_urlsafe(8)
    query = share_query(model_name, top_k, shared=share_id)
    outputs = render(answer, query, SHARE_NOTE.format(count=SHARED_ANSWERS))
    with SHARED_LOCK:  # the answer only (never the photo), shown to whoever opens the link as a shared answer
        SHARED[share_id] = render(dataclasses.replace(answer, query=SHARED_PHOTO_QUERY), query)
        while len(SHARED) > SHARED_ANSWERS:
            SHARED.popitem(last=False)
    return outputs


def locate_upload(payload, top_k, model_name, request: gr.Request):
    """A new upload: checked at once (a file that is not an image is removed from the box with a message, so
    that no broken preview stays), then located."""
    if payload is None:
        return (gr.update(),) * 5
    path, name = payload["path"], payload.get("orig_name")
    try:
        image = decode_upload(path, name)
    except gr.Error as error:
        gr.Warning(error.message)
        return (None,) + (gr.update(),) * 4
    return (gr.update(), *locate_photo(image, parse_top_k(top_k), parse_model(model_name), request))


def locate_example(top_k: int, model_name: str, event: gr.SelectData, request: gr.Request):
    """A click on an example: its image in the box, the answer, its true location and the error in km."""
    key = list(EXAMPLES)[event.index]
    path, truth = EXAMPLES[key]
    answer = answer_for(request, model_name, top_k, image=str(path), query=f"The {truth.label} example",
                        truth=truth)
    return (str(path), *render(answer, share_query(model_name, top_k, example=key)), f"example:{key}")


def locate_description(text: str, top_k: int, model_name: str, request: gr.Request):
    """The Locate button of the Description tab."""
    answer = answer_for(request, model_name, top_k, text=text or "")
    return render(answer, share_query(model_name, top_k, text=(text or "").strip()))


def open_link(request: gr.Request):
    """Page load: reproduce the answer a share link names (`example`, `text` or `shared`, with `k` and `model`).
    Returns (image, text, tabs, top_k, model, summary, map, details, insight, last query)."""
    params = dict(request.query_params) if request is not None else {}
    unchanged = (gr.update(),) * 10
    if not {"example", "text", "shared"} & set(params):
        return unchanged
    top_k, model_name = parse_top_k(params.get("k", DEFAULT_TOP_K)), parse_model(params.get("model"))
    settings = (gr.update(value=top_k), gr.update(value=model_name))
    if "shared" in params:
        with SHARED_LOCK:
            outputs = SHARED.get(params["shared"])
        if outputs is None:
            raise readable_error("This shared answer is no longer available: answers for uploaded photos are kept "
                                 "only while the Space runs. Upload the photo again.")
        return (gr.update(), gr.update(), gr.update(selected="photo"), *settings, *outputs, None)
    if "example" in params:
        if params["example"] not in EXAMPLES:
            raise readable_error(f"Unknown example {params['example']!r}: choose one of {', '.join(EXAMPLES)}.")
        path, truth = EXAMPLES[params["example"]]
        answer = answer_for(request, model_name, top_k, image=str(path), query=f"The {truth.label} example",
                            truth=truth)
        query = share_query(model_name, top_k, example=params["example"])
        return (str(path), gr.update(), gr.update(selected="photo"), *settings, *render(answer, query),
                f"example:{params['example']}")
    answer = answer_for(request, model_name, top_k, text=params["text"])
    query = share_query(model_name, top_k, text=params["text"])
    return (gr.update(), params["text"], gr.update(selected="text"), *settings, *render(answer, query), "text")


def note_markdown(model_name: str) -> str:
    """The selected model's caveat, for the note under the model menu (Markdown renders HTML: escaped)."""
    note = model_note(model_name)
    return f"⚠ {html.escape(note)}" if note else ""


def model_switched(model_name: str, top_k, image, text: str, last: str | None, request: gr.Request):
    """The visitor picked another model: the last query (photo, example or description) is answered again
    with it; when there is none, or the new model cannot answer it (a description for a model that reads
    none), the old answer is cleared, so that no answer stays on screen under the wrong model's name.
    Returns (summary, map, details, insight, last)."""
    model_name, top_k = parse_model(model_name), parse_top_k(top_k)
    try:
        if last == "photo" and image is not None:
            return (*locate_photo(image, top_k, model_name, request), last)
        if last and last.startswith("example:") and last[len("example:"):] in EXAMPLES:
            key = last[len("example:"):]
            path, truth = EXAMPLES[key]
            answer = answer_for(request, model_name, top_k, image=str(path), query=f"The {truth.label} example",
                                truth=truth)
            return (*render(answer, share_query(model_name, top_k, example=key)), last)
        if last == "text" and READS_TEXT.get(model_name) and (text or "").strip():
            return (*locate_description(text, top_k, model_name, request), last)
    except gr.Error:
        pass
    cleared = (f"<div id='answer-summary' class='answer-summary empty'><div class='headline'>Where is this?</div>"
               f"<div class='sub'>Model changed to <b>{html.escape(model_name)}</b>: add a photo or pick an "
               "example to see its answer.</div></div>")
    return cleared, empty_map(), "", "", None


def model_changed(model_name: str):
    """The Description tab can be opened only for models that read text (back to Photo otherwise)."""
    reads_text = READS_TEXT.get(model_name, False)
    return gr.update(interactive=reads_text), gr.update() if reads_text else gr.update(selected="photo")


def api_image(image, top_k: int, model_name: str, request: gr.Request) -> dict:
    """Geolocate a photo: the top-k places (latitude, longitude, probability, the place in words: country or sea,
    nearest town when near), the probability by country or sea, and what the model declares (uncertainty points,
    scenes, attention)."""
    if image is None:
        raise readable_error("Give an image, e.g. handle_file('photo.jpg').")
    return answer_for(request, model_name, top_k, image=image).to_json()


def api_text(text: str, top_k: int, model_name: str, request: gr.Request) -> dict:
    """Geolocate a description (e.g. "a beach with palm trees and volcanic rock"), as `/geolocate_image`."""
    return answer_for(request, model_name, top_k, text=text or "").to_json()


def warm_up() -> None:
    """Answer an example with every model at start-up: the first visitor then does not wait for the gazetteer,
    the land mask and plotly's validators to load (about a second)."""
    path, truth = next(iter(EXAMPLES.values()))
    for geolocator in GEOLOCATORS.values():
        render(locate(geolocator, image=str(path), top_k=DEFAULT_TOP_K, truth=truth), "")
    # The coastlines of the other zoom levels (a fraction of a second each), while the page already serves.
    threading.Thread(target=lambda: [page_lines(x_range, [-50.0, 50.0], 0.0) for x_range in
                                     ([-8.0, 8.0], [-15.0, 15.0], [-30.0, 30.0], [-60.0, 60.0])], daemon=True).start()


def banner() -> str:
    """Which model this page runs (with several: the menu at the top says which), with its caveat below."""
    if len(GEOLOCATORS) > 1:
        return f"**Models:** {len(GEOLOCATORS)}, pick one below"
    return f"**Model:** {html.escape(DEFAULT_MODEL_NAME)}"  # Markdown renders HTML


SCROLL_TO_ANSWER = """() => {
  if (!document.querySelector('#answer-summary') || document.querySelector('#answer-summary.empty')) return;
  document.getElementById('main-row').classList.add('answered');  // on a phone, the answer moves above the inputs
  const answer = document.getElementById('results-column');
  const top = answer ? answer.getBoundingClientRect().top : 0;
  if (answer && (top < 0 || top > (innerWidth <= 768 ? 60 : innerHeight / 2)))
    answer.scrollIntoView({behavior: 'smooth', block: 'start'});
}"""

with gr.Blocks(title="Where is this? Image geolocation",
               delete_cache=(max(1, FILE_LIFETIME_S // 4), FILE_LIFETIME_S)) as demo:
    gr.Markdown("## Where is this? Find where a photo was taken", elem_id="title")
    gr.Markdown(banner(), elem_id="model-banner")
    with gr.Row(equal_height=False, elem_id="model-row"):  # the model menu first: it decides what follows
        model = ModelChoice(list(GEOLOCATORS), value=DEFAULT_MODEL_NAME, label="Model", scale=1, min_width=260,
                            visible=len(GEOLOCATORS) > 1, elem_id="model")
        note = gr.Markdown(note_markdown(DEFAULT_MODEL_NAME), elem_id="model-note")
    with gr.Row(equal_height=False, elem_id="main-row"):
        with gr.Column(scale=2, min_width=300, elem_id="inputs-column"):
            with gr.Tabs(selected="photo") as tabs:
                with gr.Tab("Photo", id="photo"):
                    image = CheckedImage(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                         label="Photo", height=230, elem_id="photo")
                    image_button = gr.Button("Locate this photo", variant="primary", elem_id="locate-photo")
                with gr.Tab("Description", id="text", visible=any(READS_TEXT.values()),
                            interactive=READS_TEXT[DEFAULT_MODEL_NAME]) as text_tab:
                    text = gr.Textbox(label="Describe a place", placeholder=TEXT_EXAMPLES[0],
                                      max_length=MAX_TEXT_CHARS, elem_id="description")
                    text_button = gr.Button("Locate this description", variant="primary", elem_id="locate-text")
                    text_examples = gr.Examples([[t] for t in TEXT_EXAMPLES], inputs=[text], cache_examples=False,
                                                api_visibility="private")
            gr.Markdown("**Examples:** click one (crops of a Natural Earth map)", elem_id="examples-title")
            examples = gr.Gallery([(str(path), truth.label) for path, truth in EXAMPLES.values()],
                                  show_label=False, columns=3,
                                  height="auto", allow_preview=False, interactive=False, object_fit="cover",
                                  buttons=[], elem_id="examples")
            top_k = TopK(1, MAX_TOP_K, value=DEFAULT_TOP_K, step=1, precision=0, label="Guesses to show",
                         elem_id="top-k")
        with gr.Column(scale=3, min_width=320, elem_id="results-column"):
            summary = gr.HTML(EMPTY_SUMMARY, elem_id="summary")
            world = gr.Plot(empty_map(), show_label=False, elem_id="world-map")
            details = gr.HTML("", elem_id="details")
            insight = gr.HTML("", elem_id="insight")
            gr.HTML("<button type='button' id='back-to-inputs' onclick=\"document.getElementById('inputs-column')"
                    ".scrollIntoView({behavior: 'smooth', block: 'start'})\">↑ Another photo or example</button>",
                    elem_id="back")
    api_answer = gr.JSON(visible=False)
    last = gr.State(None)  # the last query answered ("photo", "text" or "example:KEY"), for a model switch

    results = [summary, world, details, insight]
    # Errors show as a message and leave the previous answer in place (no progress overlay on the results).
    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id="model")
    remember = dict(api_visibility="private", show_progress="hidden", queue=False)
    image_button.click(locate_photo, [image, top_k, model], results, **ui).success(
        lambda: "photo", None, last, **remember).success(None, js=SCROLL_TO_ANSWER)
    image.upload(locate_upload, [image, top_k, model], [image, *results], preprocess=False, **ui).success(
        lambda: "photo", None, last, **remember).success(None, js=SCROLL_TO_ANSWER)
    examples.select(locate_example, [top_k, model], [image, *results, last], **ui).success(None, js=SCROLL_TO_ANSWER)
    for trigger in (text_button.click, text.submit, text_examples.load_input_event.then):
        trigger(locate_description, [text, top_k, model], results, **ui).success(
            lambda: "text", None, last, **remember).success(None, js=SCROLL_TO_ANSWER)
    model.change(model_changed, model, [text_tab, tabs], api_visibility="private", show_progress="hidden")
    model.change(note_markdown, model, note, **remember)
    model.input(model_switched, [model, top_k, image, text, last], [*results, last], **ui)
    demo.load(open_link, None, [image, text, tabs, top_k, model, *results, last], **ui).success(
        None, js=SCROLL_TO_ANSWER)
    # The API: the answer as JSON (no page rendering), through the same checks and queue.
    gr.on([], api_image, [image, top_k, model], api_answer, api_name="geolocate_image", concurrency_id="model")
    gr.on([], api_text, [text, top_k, model], api_answer, api_name="geolocate_text", concurrency_id="model")

warm_up()
gr.set_static_paths([static_folder()])
demo.queue(default_concurrency_limit=WORKERS, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    demo.launch(max_file_size=MAX_FILE_SIZE, css=CSS)
