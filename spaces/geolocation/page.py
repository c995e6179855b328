"""How the Space draws an `answers.Answer`: the map (plotly), the answer panel, the top-k table, the country
roll-up, the share link and downloads, and GeoHier's scene and attention panel.

The map is a plotly figure on plain longitude/latitude axes (no map tiles, no WebGL, no fonts fetched): its base
layer is the bundled Natural Earth raster, written once as a JPEG and referenced by URL, so an answer carries
only its own data. Pins are numbered by rank with the best drawn last (on top) and named, over an uncertainty
layer: GeoCLIP's probability over its gallery as a heat raster, GeoHier's most probable fine S2 cells as
polygons. The view zooms to the answer (the whole world when the guesses are spread); longitudes are drawn in a
frame centred on the answer when it straddles the antimeridian, over copies of the base map on either side.
"""

import base64
import hashlib
import html
import io
import json
import math
import os
import tempfile
import urllib.parse
from functools import lru_cache
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import s2geometry as s2
from gradio.components.plot import PlotData
from PIL import Image

from answers import AT_SEA, Answer, format_coordinates, format_percent
from trust import confidence_line, headline_html
from geoloc.geography.geodesy import unit_vectors, vector_directions
from geoloc.data.worldmap import load_world_map

BEST_COLOUR = "#d7261e"
OTHER_COLOUR = "#1f4e9c"
TRUTH_COLOUR = "#12853b"
WATER_COLOUR = "#b9d3e6"  # the lightened base map's ocean, beyond the poles and while the image loads
BASEMAP_LIGHTEN = 0.4  # blend of the base map towards white, so that pins and the uncertainty layer stand out
HEAT_STOPS = np.array([[255, 237, 160], [254, 178, 76], [253, 141, 60], [240, 59, 32], [189, 0, 38]], float)
HEAT_MAX_PIXELS = 480  # longer side of the heat raster (it is smooth: the browser scales it up)
CELL_SHADES = ((0.5, "rgba(189,0,38,0.55)"), (0.2, "rgba(240,59,32,0.45)"), (0.05, "rgba(253,141,60,0.38)"),
               (0.0, "rgba(254,204,92,0.32)"))  # (share of the best cell's probability, fill)
CELL_MASS = 0.95  # draw the most probable cells up to this much probability ...
MAX_CELLS = 400  # ... and at most this many
WORLD_SPAN = (140.0, 70.0)  # guesses spread wider than this (degrees of longitude, latitude): world view
MIN_SPAN = (18.0, 10.0)  # the tightest view: the base map has 0.5 degrees per pixel
MAP_CONFIG = {"scrollZoom": True, "displaylogo": False, "responsive": True, "doubleClick": "reset",
              "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "toImage"]}


# -------------------------------------------------------------------------------------------- base map
@lru_cache(maxsize=1)
def basemap_file() -> Path:
    """The bundled Natural Earth raster (plate carree, 720 x 360), lightened, as a JPEG (~40 kB) in a folder of
    its own in Gradio's file folder (`GRADIO_TEMP_DIR`); the app serves it as a static file."""
    world = load_world_map().astype(np.float32)
    light = (world * (1 - BASEMAP_LIGHTEN) + 255 * BASEMAP_LIGHTEN).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(light).save(buffer, format="JPEG", quality=85, optimize=True)
    data = buffer.getvalue()
    gradio_files = os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"
    folder = Path(gradio_files) / "geoloc-space-static"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"basemap-{hashlib.sha256(data).hexdigest()[:12]}.jpg"
    if not path.is_file():
        path.write_bytes(data)
    return path


def basemap_url() -> str:
    """The base map's URL relative to the page (Gradio's file route), so that it works under any host."""
    return f"gradio_api/file={basemap_file()}"


# ------------------------------------------------------------------------------------------------ frame
def wrap_longitudes(longitudes, centre: float) -> np.ndarray:
    """Longitudes shifted by multiples of 360 into [centre - 180, centre + 180)."""
    return (np.asarray(longitudes, float) - centre + 180) % 360 - 180 + centre


def frame_centre(longitudes) -> float:
    """The longitude the map is drawn around: 0 (the usual world map) unless the points, taken around the first
    one, straddle the antimeridian; then the first point's longitude."""
    around_first = wrap_longitudes(longitudes, float(longitudes[0]))
    return 0.0 if np.all(np.abs(around_first) <= 180) else float(longitudes[0])


def view_ranges(latitudes, xs, centre: float) -> tuple[list[float], list[float], bool]:
    """`(x range, y range, world)`: a view around the points (longitudes `xs` in the frame around `centre`) with
    a margin, or the world around `centre` when they are spread."""
    latitudes, xs = np.asarray(latitudes, float), np.asarray(xs, float)
    span_x, span_y = np.ptp(xs), np.ptp(latitudes)
    if span_x > WORLD_SPAN[0] or span_y > WORLD_SPAN[1]:
        south, north = min(-58.0, latitudes.min() - 5), max(84.0, latitudes.max() + 5)
        return [centre - 180, centre + 180], [max(-90.0, south), min(90.0, north)], True
    width, height = max(span_x * 1.5 + 8, MIN_SPAN[0]), max(span_y * 1.5 + 5, MIN_SPAN[1])  # room for labels
    middle_x, middle_y = (xs.min() + xs.max()) / 2, (latitudes.min() + latitudes.max()) / 2
    middle_y = min(max(middle_y, -90 + height / 2), 90 - height / 2)
    return ([middle_x - width / 2, middle_x + width / 2], [middle_y - height / 2, middle_y + height / 2], False)


# ------------------------------------------------------------------------------------ uncertainty layers
def heat_bandwidth(latitudes, longitudes, probabilities) -> float:
    """Smoothing of the heat layer (degrees): about the spacing of the most probable candidates, so that a
    coarse gallery gives a continuous heat and a dense one a sharp one."""
    top = np.argsort(-probabilities)[:200]
    if len(top) < 2:
        return 2.0
    vectors = unit_vectors(latitudes[top], longitudes[top])
    cosines = np.clip(vectors @ vectors.T, -1, 1)
    np.fill_diagonal(cosines, -1)
    spacing = np.degrees(np.arccos(cosines.max(axis=1)))
    return float(np.clip(0.8 * np.median(spacing), 0.25, 6.0))


def _blur(grid: np.ndarray, sigma_pixels: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero outside)."""
    radius = max(1, int(3 * sigma_pixels))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_pixels) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(grid, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        length = grid.shape[axis]
        grid = sum(weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
                   for offset, weight in enumerate(kernel))
    return grid


def heat_layer(uncertainty: np.ndarray, centre: float) -> dict | None:
    """The uncertainty points `(N, 3)` (latitude, longitude, probability) as a translucent heat raster: a plotly
    layout image (PNG data URL) placed in the frame around `centre`, or None when there is nothing to draw."""
    latitudes, longitudes, probabilities = uncertainty[:, 0], uncertainty[:, 1], uncertainty[:, 2]
    if len(probabilities) == 0 or not probabilities.max() > 0:
        return None
    xs = wrap_longitudes(longitudes, centre)
    sigma = heat_bandwidth(latitudes, longitudes, probabilities)
    order = np.argsort(-probabilities)
    held = order[: np.searchsorted(np.cumsum(probabilities[order]), 0.995 * probabilities.sum()) + 1]
    west, east = xs[held].min() - 3 * sigma, xs[held].max() + 3 * sigma
    south, north = max(-90.0, latitudes[held].min() - 3 * sigma), min(90.0, latitudes[held].max() + 3 * sigma)
    resolution = max(sigma / 2, max(east - west, north - south) / HEAT_MAX_PIXELS)
    columns, rows = max(2, math.ceil((east - west) / resolution)), max(2, math.ceil((north - south) / resolution))
    grid, _, _ = np.histogram2d(north - latitudes, xs - west, bins=[rows, columns],
                                range=[[0, rows * resolution], [0, columns * resolution]], weights=probabilities)
    grid = _blur(grid, sigma / resolution)
    level = grid / grid.max()
    position = np.clip(level, 0, 1) * (len(HEAT_STOPS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_STOPS) - 2)
    colour = HEAT_STOPS[low] + (HEAT_STOPS[low + 1] - HEAT_STOPS[low]) * (position - low)[..., None]
    alpha = np.where(level < 0.03, 0, 215 * np.sqrt(level))
    rgba = np.dstack([colour, alpha]).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=3)
    return dict(source="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                xref="x", yref="y", x=west, y=south + rows * resolution, sizex=columns * resolution,
                sizey=rows * resolution, sizing="stretch", layer="below", opacity=1)


@lru_cache(maxsize=20_000)
def cell_outline(token: str, points_per_edge: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """The outline of an S2 cell as `(latitudes, longitudes)`, closed, each edge followed along its great
    circle; longitudes continuous across the antimeridian; a cell around a pole is closed along the pole."""
    cell = s2.S2Cell(s2.S2CellId.FromToken(token))
    corners = np.array([[vertex.x(), vertex.y(), vertex.z()] for vertex in map(cell.GetVertex, range(4))])
    steps = np.linspace(0, 1, points_per_edge, endpoint=False)[:, None]
    edges = [corners[k] * (1 - steps) + corners[(k + 1) % 4] * steps for k in range(4)]
    latitudes, longitudes = vector_directions(np.concatenate(edges + [corners[:1]]))
    longitudes = np.unwrap(longitudes, period=360)
    for pole in (90.0, -90.0):
        if cell.Contains(s2.S2LatLng.FromDegrees(pole, 0).ToPoint()):
            latitudes = np.concatenate([latitudes, [pole, pole, latitudes[0]]])
            longitudes = np.concatenate([longitudes, [longitudes[-1], longitudes[0], longitudes[0]]])
    return latitudes, longitudes


def cell_traces(tokens: list[str], probabilities: np.ndarray, centre: float) -> list[go.Scatter]:
    """GeoHier's most probable fine cells (up to `CELL_MASS` of the probability, at most `MAX_CELLS`) as filled
    polygons, one trace per shade (darker = more probable)."""
    order = np.argsort(-probabilities)
    count = min(MAX_CELLS, int(np.searchsorted(np.cumsum(probabilities[order]), CELL_MASS)) + 1, len(order))
    best = probabilities[order[0]]
    shapes: dict[str, tuple[list, list]] = {fill: ([], []) for _, fill in CELL_SHADES}
    for index in order[:count]:
        latitudes, longitudes = cell_outline(tokens[index])
        middle = wrap_longitudes([longitudes.mean()], centre)[0]
        xs = longitudes + (middle - longitudes.mean())
        fill = next(fill for share, fill in CELL_SHADES if probabilities[index] >= share * best)
        shapes[fill][0].extend([*latitudes, None])
        shapes[fill][1].extend([*xs, None])
    return [
        go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=fill, line=dict(color=fill, width=0.6),
                   hoverinfo="skip", showlegend=False, name="cells")
        for fill, (ys, xs) in shapes.items() if ys
    ]


# --------------------------------------------------------------------------------------------------- map
def _base_layout(x_range, y_range, world: bool) -> dict:
    """Axes in degrees with the base map (and a copy either side), no ticks, panning by drag."""
    middle = (y_range[0] + y_range[1]) / 2
    images = [dict(source=basemap_url(), xref="x", yref="y", x=-180 + shift, y=90, sizex=360, sizey=180,
                   sizing="stretch", layer="below") for shift in (-360, 0, 360)]
    axis = dict(visible=False, showgrid=False, zeroline=False, fixedrange=False)
    return dict(
        images=images,
        xaxis=dict(axis, range=x_range),
        yaxis=dict(axis, range=y_range, scaleanchor="x",
                   scaleratio=1 if world else 1 / math.cos(math.radians(min(abs(middle), 70)))),
        margin=dict(l=0, r=0, t=0, b=0), paper_bgcolor=WATER_COLOUR, plot_bgcolor=WATER_COLOUR,
        dragmode="pan", hovermode="closest", showlegend=True,
        legend=dict(orientation="h", x=0, y=0, xanchor="left", yanchor="top", bgcolor="rgba(255,255,255,0)",
                    font=dict(size=12), itemclick="toggle", itemdoubleclick=False),
        font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"),
    )


def _plot(figure: go.Figure) -> PlotData:
    """A figure for `gr.Plot`, with the map's plotly config (wheel and pinch zoom, no logo)."""
    spec = json.loads(figure.to_json())
    spec["config"] = MAP_CONFIG
    return PlotData(type="plotly", plot=json.dumps(spec))


def empty_map() -> PlotData:
    """The world before any answer (drawn at page load, so that the first answer only updates it)."""
    figure = go.Figure(layout=_base_layout([-180, 180], [-58, 84], True))
    figure.update_layout(showlegend=False)
    return _plot(figure)


def world_map(answer: Answer, cell_tokens: list[str] | None = None) -> PlotData:
    """The answer on the map: numbered pins (best on top, named), the true location of an example, and the
    uncertainty layer (heat, or GeoHier's cells when `cell_tokens` name the uncertainty points' cells)."""
    result = answer.result
    latitudes, longitudes, probabilities = result.latitudes, result.longitudes, result.probabilities
    truth = answer.truth
    shown_lat = np.append(latitudes, truth.latitude) if truth else latitudes
    shown_lon = np.append(longitudes, truth.longitude) if truth else longitudes
    centre = frame_centre(shown_lon)
    xs = wrap_longitudes(longitudes, centre)
    x_range, y_range, world = view_ranges(shown_lat, wrap_longitudes(shown_lon, centre), centre)
    layout = _base_layout(x_range, y_range, world)
    figure = go.Figure()
    uncertainty = result.uncertainty
    if uncertainty is not None and cell_tokens is not None:
        for trace in cell_traces(cell_tokens, uncertainty[:, 2], centre):
            figure.add_trace(trace)
        figure.add_trace(_legend_entry("Predicted cells", "square", "rgba(240,59,32,0.6)"))
    elif uncertainty is not None:
        heat = heat_layer(uncertainty, centre)
        if heat is not None:
            layout["images"].append(heat)
            figure.add_trace(_legend_entry("Probability", "square", "rgba(240,59,32,0.8)"))
    rows = answer.rows()
    hover = [[row["rank"], html.escape(row["phrase"]), format_percent(row["probability"]),
              format_coordinates(row["latitude"], row["longitude"])] for row in rows]
    template = "<b>#%{customdata[0]}</b> %{customdata[1]}<br>%{customdata[2]} · %{customdata[3]}<extra></extra>"
    if truth:
        truth_x = wrap_longitudes([truth.longitude], centre)[0]
        figure.add_trace(go.Scatter(
            x=[truth_x, xs[0]], y=[truth.latitude, latitudes[0]], mode="lines", hoverinfo="skip",
            line=dict(color=TRUTH_COLOUR, width=2, dash="dot"), showlegend=False, name="error"))
    others = slice(len(rows) - 1, 0, -1)  # ranks k..2: rank 2 drawn over rank 3, ...
    if len(rows) > 1:
        figure.add_trace(go.Scatter(
            x=xs[others], y=latitudes[others], mode="markers+text", name=f"Guesses 2–{len(rows)}",
            text=[str(rank) for rank in range(len(rows), 1, -1)], textposition="middle center",
            textfont=dict(color="white", size=11), customdata=hover[others], hovertemplate=template,
            marker=dict(size=21, color=OTHER_COLOUR, line=dict(color="white", width=1.5))))
    figure.add_trace(go.Scatter(
        x=xs[:1], y=latitudes[:1], mode="markers+text", name="Best guess", text=["1"],
        textposition="middle center", textfont=dict(color="white", size=14), customdata=hover[:1],
        hovertemplate=template, marker=dict(size=30, color=BEST_COLOUR, line=dict(color="white", width=2))))
    figure.add_trace(go.Scatter(  # the best guess's name beside its pin (an invisible marker of the pin's size)
        x=xs[:1], y=latitudes[:1], mode="markers+text", text=[f"<b>{html.escape(rows[0]['place'])}</b>"],
        textposition="middle left" if xs[0] > sum(x_range) / 2 else "middle right",  # towards the middle
        hoverinfo="skip", showlegend=False, name="best-label",
        marker=dict(size=34, opacity=0),
        textfont=dict(color="#222", size=13, shadow="0 0 3px white, 0 0 3px white, 0 0 2px white")))
    if truth:
        figure.add_trace(go.Scatter(
            x=[wrap_longitudes([truth.longitude], centre)[0]], y=[truth.latitude], mode="markers",
            name="True location", hovertemplate=f"True location: {html.escape(truth.label)}<extra></extra>",
            marker=dict(symbol="star", size=22, color=TRUTH_COLOUR, line=dict(color="white", width=1.5))))
    world_x = [centre - 180, centre + 180]
    layout["updatemenus"] = [dict(
        type="buttons", direction="right", x=0.01, y=0.98, xanchor="left", yanchor="top", showactive=False,
        bgcolor="white", bordercolor="#999", font=dict(size=12), pad=dict(l=2, r=2, t=2, b=2),
        buttons=[dict(label="Answer", method="relayout", args=[{"xaxis.range": x_range, "yaxis.range": y_range}]),
                 dict(label="World", method="relayout", args=[{"xaxis.range": world_x, "yaxis.range": [-58, 84]}])],
    )]
    figure.update_layout(**layout)
    return _plot(figure)


def _legend_entry(name: str, symbol: str, colour: str) -> go.Scatter:
    """A legend item for a layer that is not a trace of its own (the heat raster, the cells)."""
    return go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                      marker=dict(symbol=symbol, size=12, color=colour))


# ------------------------------------------------------------------------------------------ answer panel
EMPTY_SUMMARY = (
    '<div id="answer-summary" class="answer-summary empty"><div class="headline">Where is this?</div>'
    '<div class="sub">Pick an example or add a photo: the most likely country, the best guess on the map and '
    'the top guesses appear here.</div></div>'
)


def summary_html(answer: Answer) -> str:
    """The answer in words, above the map: the most likely country with its probability, the best guess (place,
    coordinates, probability) and, for an example, the true location and the error in km."""
    rows = answer.rows()
    best = rows[0]
    (country, share), rest = answer.countries[0], answer.countries[1:3]
    where = "at sea" if country == AT_SEA else f"in <b>{html.escape(country)}</b>"
    lead = "Most likely" if share >= 0.5 else "Possibly" if share >= 0.2 else "Unsure — perhaps"
    alternatives = ", ".join(f"{html.escape(c)} {format_percent(p)}" for c, p in rest)
    calibrated = headline_html(answer)  # trust.py: one story per answer (calibrated, or "cannot tell")
    if calibrated is not None:
        lines = [calibrated, confidence_line(answer)]
    else:
        lines = [f"<div class='headline'>{lead} {where} <span class='pct'>{format_percent(share)} likely</span></div>"]
        if alternatives and share < 0.5:
            lines.append(f"<div class='alt'>Also possible: {alternatives}</div>")
    lines += [
        f"<div class='sub'>Best guess <span class='rank best'>1</span> <b>{html.escape(best['phrase'])}</b> · "
        f"{format_coordinates(best['latitude'], best['longitude'])} ({format_percent(best['probability'])})</div>",
    ]
    if answer.truth is not None:
        lines.append(f"<div class='truth'><span class='star'>★</span> True location: "
                     f"<b>{html.escape(answer.truth.label)}</b> "
                     f"({format_coordinates(answer.truth.latitude, answer.truth.longitude)}) — the best guess is "
                     f"<b>{answer.error_km:,.0f} km</b> away</div>")
    lines.append(f"<div class='query'>{html.escape(answer.query)} · model {html.escape(answer.model)}</div>")
    return f"<div id='answer-summary' class='answer-summary'>{''.join(lines)}</div>"


def details_html(answer: Answer, share_query: str) -> str:
    """Below the map: the top-k table (rank, place with coordinates, probability), the country roll-up, the
    share link and the downloads (CSV, GeoJSON)."""
    best_probability = answer.rows()[0]["probability"] or 1.0
    body = "".join(
        f"<tr><td class='r'><span class='rank{' best' if row['rank'] == 1 else ''}'>{row['rank']}</span></td>"
        f"<td class='place'>{html.escape(row['phrase'])}"
        f"<span class='coords'>{format_coordinates(row['latitude'], row['longitude'])}</span></td>"
        f"<td class='p'><span class='bar' style='width:{40 * row['probability'] / best_probability:.0f}px'>"
        f"</span>{format_percent(row['probability'])}</td></tr>"
        for row in answer.rows()
    )
    shown = answer.countries[:4]
    other = max(0.0, sum(p for _, p in answer.countries) - sum(p for _, p in shown))
    countries = " · ".join(f"{html.escape(c)} <b>{format_percent(p)}</b>" for c, p in shown)
    countries += f" · elsewhere {format_percent(other)}" if other >= 0.001 else ""
    csv_url = "data:text/csv;charset=utf-8," + urllib.parse.quote(answer.to_csv())
    geojson_url = "data:application/geo+json;charset=utf-8," + urllib.parse.quote(answer.to_geojson())
    copy = ("navigator.clipboard.writeText(document.getElementById('share-link').href)"
            ".then(() => { this.textContent = 'Link copied'; }, () => { this.textContent = 'Copy failed'; })")
    return (
        "<div id='answer-details' class='answer-details'>"
        f"<table id='top-k-table' class='topk'><thead><tr><th>#</th><th>Place</th><th>Probability</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
        f"<div id='countries' class='countries'>By country: {countries}</div>"
        "<div class='actions'>"
        f"<a id='share-link' class='action' href='?{html.escape(share_query)}' target='_top'>Share link</a>"
        f"<button type='button' id='copy-link' class='action' onclick=\"{html.escape(copy)}\">Copy link</button>"
        f"<a id='download-csv' class='action' href='{csv_url}' download='where-is-this.csv'>Download CSV</a>"
        f"<a id='download-geojson' class='action' href='{geojson_url}' download='where-is-this.geojson'>"
        "Download GeoJSON</a></div></div>"
    )


def insight_html(answer: Answer, show_scenes: bool) -> str:
    """GeoHier's scene (only for models trained with scene labels) and where it looked at each level of the
    cell hierarchy; empty for models that give neither."""
    result = answer.result
    parts = []
    if show_scenes and result.scenes:
        scenes = sorted(result.scenes.items(), key=lambda item: -item[1])[:3]
        parts.append("<div class='scenes'>Scene: " + " · ".join(
            f"<b>{html.escape(name)}</b> {format_percent(p)}" for name, p in scenes) + "</div>")
    if result.attention:
        figures = "".join(
            f"<figure><img alt='{html.escape(level.caption)}' src='{_jpeg_data_url(level.overlay)}'>"
            f"<figcaption>{html.escape(level.caption)}</figcaption></figure>" for level in result.attention)
        parts.append("<div class='attention-title'>Where the model looked (red), per level of its cell hierarchy"
                     f"</div><div class='attention'>{figures}</div>")
    return f"<div id='model-insight' class='insight'>{''.join(parts)}</div>" if parts else ""


def _jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


CSS = """
.answer-summary { padding: 6px 4px 4px; line-height: 1.35; }
.answer-summary .headline { font-size: 1.45rem; font-weight: 600; }
.answer-summary .headline .pct { color: #b31d16; margin-left: .25em; }
.answer-summary .headline.unfamiliar { color: #7a4b00; }
.answer-summary .unfamiliar-note, .answer-summary .confidence { font-size: .95rem; color: #444; }
.answer-summary .alt { font-size: .95rem; color: #444; }
.answer-summary .sub, .answer-summary .truth { font-size: 1rem; margin-top: 2px; }
.answer-summary .query { font-size: .85rem; color: #666; margin-top: 2px; }
.answer-summary.empty .headline { color: #444; }
.answer-summary .star { color: #12853b; }
.rank { display: inline-block; min-width: 1.45em; height: 1.45em; line-height: 1.45em; border-radius: 50%;
        background: #1f4e9c; color: white; text-align: center; font-size: .8em; font-weight: 600; }
.rank.best { background: #d7261e; }
#answer-details table.topk { border-collapse: collapse; width: 100%; font-size: .92rem; margin: 2px 0 4px;
                            border: none; }
#answer-details .topk th { text-align: left; font-weight: 600; color: #555; white-space: nowrap; padding: 2px 6px;
                           border: none; border-bottom: 1px solid #ccc; background: none; }
#answer-details .topk tr { border: none; }
#answer-details .topk td { padding: 3px 6px; border: none; border-bottom: 1px solid #eee; vertical-align: middle;
                           background: none; }
.topk td.r { width: 2em; }
.topk td.place .coords { font-size: .8rem; color: #666; margin-left: .6em; white-space: nowrap;
                         font-variant-numeric: tabular-nums; }
.topk td.p { white-space: nowrap; width: 7.5em; font-variant-numeric: tabular-nums; }
.topk .bar { display: inline-block; height: .6em; background: #f0883e; border-radius: 2px; margin-right: 5px;
             vertical-align: middle; min-width: 1px; }
.countries { font-size: .92rem; margin: 4px 2px; }
.actions { display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0 2px; }
.actions .action { font-size: .88rem; padding: 3px 10px; border: 1px solid #bbb; border-radius: 6px;
                   text-decoration: none; color: inherit; background: white; cursor: pointer;
                   font: inherit; font-size: .88rem; font-weight: 400; line-height: 1.4; }
.insight .scenes, .insight .attention-title { font-size: .95rem; margin: 6px 2px; }
.insight .attention { display: flex; gap: 8px; flex-wrap: wrap; }
.insight figure { margin: 0; width: 150px; }
.insight figure img { width: 150px; height: 150px; border-radius: 4px; }
.insight figcaption { font-size: .8rem; color: #555; }
#world-map [data-testid=plotly] { height: clamp(300px, 45vw, 400px); }
#title h2 { margin: 0 0 2px; }
#model-banner { font-size: .85rem; color: #555; }
#model-banner p { margin: 0; }
#examples .grid-wrap { min-height: 0; height: auto; max-height: none; }  /* as tall as the thumbnails */
@media (max-width: 768px) {
  #main-row.answered #results-column { order: -1; }
  .answer-summary .headline { font-size: 1.25rem; }
}
"""
