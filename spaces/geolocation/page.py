"""How the Space draws an `answers.Answer`: the map (plotly), the answer panel, the top-k table, the country
roll-up, the share link and downloads, and GeoHier's scene and attention panel.

The map is a plotly figure on plain longitude/latitude axes (no map tiles, no WebGL, no fonts fetched): its base
layer is the bundled Natural Earth raster, written once as a JPEG and referenced by URL; over it, coastlines and
land borders as vector lines and the names of the countries in view (Natural Earth 1:50m, shipped with geoloc:
`geoloc.geography.places`), detailed around the answer and coarse elsewhere, so that an answer carries about 100 kB.
Pins are numbered by rank with the best drawn last (on top), each named beside it where the name covers no other
pin or name (placed for the smallest map, a phone's; a pin that would cover another is moved aside with a line
to its guess), over an uncertainty layer: GeoCLIP's probability over its gallery as a heat raster, GeoHier's most probable fine S2 cells as
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

from answers import Answer, format_coordinates, format_percent
from trust import confidence_line, headline_html
from geoloc.geography.geodesy import unit_vectors, vector_directions
from geoloc.geography.places import country_labels, in_words, map_lines
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
COAST_COLOUR = "#2d5d7b"
BORDER_COLOUR = "#8c7b6b"
WORLD_SPAN = (140.0, 70.0)  # guesses spread wider than this (degrees of longitude, latitude): world view
MIN_SPAN = (12.0, 7.0)  # the tightest view (the coastlines are vectors; the relief raster is 0.5 degree/px)
MAP_CONFIG = {"scrollZoom": True, "displaylogo": False, "responsive": True, "doubleClick": "reset",
              "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "toImage"]}
# Pins and labels are placed apart for the smallest map the page draws (a 390 px phone: about 320 x 240 px);
# a larger map only moves them further apart. The map of a desktop is about 740 px wide.
SMALL_MAP, WIDE_MAP = (320.0, 240.0), 740.0
WIDE_SIZE = (720.0, 370.0)  # the desktop's map (1280 px wide window), without the legend
PIN_RADIUS = (16.0, 11.5)  # px, with the white ring: the best guess, the others
BUTTONS_BOX = (0.0, 0.0, 150.0, 58.0)  # px from the top left: the Answer / World buttons (44 px tall or more)
LABEL_FONT, COUNTRY_FONT = 12, 11
MAX_COUNTRY_LABELS = 40


# -------------------------------------------------------------------------------------------- base map
def static_folder() -> Path:
    """A folder of its own in Gradio's file folder (`GRADIO_TEMP_DIR`) for the map's static files (the app serves
    it as a static path): the relief raster and the coastline drawings."""
    gradio_files = os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"
    folder = Path(gradio_files) / "geoloc-space-static"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _static(data: bytes, stem: str, suffix: str) -> Path:
    path = static_folder() / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}{suffix}"
    if not path.is_file():
        path.write_bytes(data)
    return path


@lru_cache(maxsize=1)
def basemap_file() -> Path:
    """The bundled Natural Earth raster (plate carree, 720 x 360), lightened, as a JPEG (~40 kB)."""
    world = load_world_map().astype(np.float32)
    light = (world * (1 - BASEMAP_LIGHTEN) + 255 * BASEMAP_LIGHTEN).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(light).save(buffer, format="JPEG", quality=85, optimize=True)
    return _static(buffer.getvalue(), "basemap", ".jpg")


def basemap_url() -> str:
    """The base map's URL relative to the page (Gradio's file route), so that it works under any host."""
    return f"gradio_api/file={basemap_file()}"


COARSE_TOLERANCE = 0.4  # degrees: the coastlines of the whole world (beyond the answer's surroundings) ...
COARSE_MIN_LENGTH = 3.0  # ... without islands smaller than this (degrees of coastline): about 5,000 points


@lru_cache(maxsize=16)
def _simplified_lines(kind: str, tolerance: float, min_length: float = 0.0):
    """The coastlines ("coast") or land borders ("borders") of `geoloc.geography.places.map_lines` as shapely lines,
    simplified to `tolerance` degrees, without those shorter than `min_length` degrees."""
    import shapely

    lines = np.array([shapely.LineString(line) for line in map_lines()[kind]], dtype=object)
    if min_length:
        lines = lines[shapely.length(lines) >= min_length]
    return shapely.simplify(lines, tolerance)


def _line_coordinates(geometries) -> tuple[np.ndarray, np.ndarray]:
    """The lines' x and y, each line followed by a NaN (a gap for plotly), as float32."""
    import shapely

    parts = [part for geometry in geometries if not geometry.is_empty
             for part in getattr(geometry, "geoms", [geometry]) if part.geom_type == "LineString"]
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    coordinates = [np.vstack([shapely.get_coordinates(part), [np.nan, np.nan]]) for part in parts]
    stacked = np.concatenate(coordinates).astype(np.float32)
    return stacked[:, 0], stacked[:, 1]


def line_traces(x_range, y_range, centre: float) -> list[go.Scatter]:
    """Coastlines and land borders (Natural Earth 1:50m, public domain, shipped with geoloc) as thin vector lines:
    detailed (simplified to about a pixel of a desktop map) around the view, up to one view's size on each side,
    and coarse for the rest of the world (for panning and the World button), in the frame around `centre`."""
    import shapely

    width, height = x_range[1] - x_range[0], y_range[1] - y_range[0]
    near = shapely.box(x_range[0] - width, y_range[0] - height, x_range[1] + width, y_range[1] + height)
    frame = shapely.box(centre - 180, -90, centre + 180, 90)
    world = shapely.box(-180, -90, 180, 90)
    detail = float(2.0 ** np.round(np.log2(width / WIDE_MAP)))  # about a pixel of a desktop map
    fine_options = (detail, 4 * detail) if detail < COARSE_TOLERANCE / 2 else (COARSE_TOLERANCE, COARSE_MIN_LENGTH)
    traces = []
    for kind, colour, line_width in (("borders", BORDER_COLOUR, 0.8), ("coast", COAST_COLOUR, 1.1)):
        fine = _simplified_lines(kind, *fine_options)  # islands under about 4 px are left out
        coarse = _simplified_lines(kind, COARSE_TOLERANCE, COARSE_MIN_LENGTH)
        pieces = []
        for shift in (-360, 0, 360):  # the lines (in [-180, 180]) that fall in the frame once moved by `shift`
            source = shapely.intersection(shapely.transform(frame, lambda xy, s=shift: xy - [s, 0]), world)
            window = shapely.intersection(shapely.transform(near, lambda xy, s=shift: xy - [s, 0]), source)
            rest = shapely.difference(source, window)
            for lines, area in ((fine, window), (coarse, rest)):
                if area.is_empty:
                    continue
                candidates = lines[shapely.intersects(lines, area)]
                clipped = shapely.intersection(candidates, area)
                pieces += list(shapely.transform(clipped, lambda xy, s=shift: xy + [s, 0]))
        xs, ys = _line_coordinates(pieces)
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=line_width),
                                 hoverinfo="skip", showlegend=False, name=kind, connectgaps=False))
    return traces


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
def _scale_ratio(y_range, world: bool) -> float:
    """How much longer on screen a degree of latitude is than one of longitude (1 for the world)."""
    middle = (y_range[0] + y_range[1]) / 2
    return 1.0 if world else 1 / math.cos(math.radians(min(abs(middle), 70)))


def _base_layout(x_range, y_range, world: bool) -> dict:
    """Axes in degrees with the relief base map (and a copy either side), no ticks, panning by drag."""
    images = [dict(source=basemap_url(), xref="x", yref="y", x=-180 + shift, y=90, sizex=360, sizey=180,
                   sizing="stretch", layer="below") for shift in (-360, 0, 360)]
    axis = dict(visible=False, showgrid=False, zeroline=False, fixedrange=False)
    return dict(
        images=images,
        xaxis=dict(axis, range=x_range),
        yaxis=dict(axis, range=y_range, scaleanchor="x", scaleratio=_scale_ratio(y_range, world)),
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


def _text_width(text: str, size: float) -> float:
    """About how wide `text` is in px in a sans-serif font of `size` px (wide enough for most fonts)."""
    return 0.6 * size * len(text) + 2


class Screen:
    """Where things fall on a map of `size` px (by default the smallest, `SMALL_MAP`; the aspect ratio kept as
    plotly keeps it), and what is already drawn there: pins (circles) and labels (boxes), so that nothing new
    covers them."""

    def __init__(self, x_range, y_range, world: bool, size: tuple[float, float] = None):
        width, height = size or SMALL_MAP
        ratio = _scale_ratio(y_range, world)
        x_span, y_span = x_range[1] - x_range[0], y_range[1] - y_range[0]
        self.scale = min(width / x_span, height / (y_span * ratio))  # px per degree of longitude
        self.ratio = ratio
        self.middle = ((x_range[0] + x_range[1]) / 2, (y_range[0] + y_range[1]) / 2)
        self.size = (width, height)
        self.circles: list[tuple[float, float, float]] = []
        left, top, right, bottom = BUTTONS_BOX
        self.boxes: list[tuple[float, float, float, float]] = [(left, top, right, bottom)]

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Screen position (px from the top left) of a point in degrees."""
        return (self.size[0] / 2 + (x - self.middle[0]) * self.scale,
                self.size[1] / 2 - (y - self.middle[1]) * self.scale * self.ratio)

    def degrees(self, px: float, py: float) -> tuple[float, float]:
        return (self.middle[0] + (px - self.size[0] / 2) / self.scale,
                self.middle[1] - (py - self.size[1] / 2) / (self.scale * self.ratio))

    def free_circle(self, px: float, py: float, radius: float) -> bool:
        return all(math.hypot(px - x, py - y) >= radius + r for x, y, r in self.circles) and all(
            not _box_hits_circle(box, px, py, radius) for box in self.boxes[1:])

    def free_box(self, box) -> bool:
        left, top, right, bottom = box
        inside = left >= 0 and top >= 0 and right <= self.size[0] and bottom <= self.size[1]
        return inside and not any(left < b[2] and b[0] < right and top < b[3] and b[1] < bottom
                                  for b in self.boxes) and not any(
            _box_hits_circle(box, x, y, r) for x, y, r in self.circles)


def _box_hits_circle(box, x: float, y: float, radius: float) -> bool:
    nearest_x, nearest_y = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
    return math.hypot(x - nearest_x, y - nearest_y) < radius


def map_screens(x_range, y_range, world: bool) -> list[Screen]:
    """The phone's map and the desktop's, where labels must fit at once."""
    return [Screen(x_range, y_range, world, SMALL_MAP), Screen(x_range, y_range, world, WIDE_SIZE)]


def place_pins(screen: Screen, xs, ys) -> list[tuple[float, float]]:
    """Where to draw each pin (best first), in degrees: at its guess, or, where that would cover a pin already
    placed, on the nearest free spot around it (then a thin line joins it to its guess)."""
    placed = []
    for rank, (x, y) in enumerate(zip(xs, ys)):
        radius = PIN_RADIUS[0] if rank == 0 else PIN_RADIUS[1]
        px, py = screen.px(x, y)
        spot = (px, py)
        if not screen.free_circle(px, py, radius):
            spot = next(((px + step * math.cos(angle), py + step * math.sin(angle))
                         for step in np.arange(1, 12) * (PIN_RADIUS[1] + 2)
                         for angle in np.radians(np.arange(0, 360, 30) + 15 * (step // 13 % 2))
                         if screen.free_circle(px + step * math.cos(angle), py + step * math.sin(angle), radius)),
                        spot)
        screen.circles.append((*spot, radius))
        placed.append(screen.degrees(*spot))
    return placed


LABEL_SIDES = ("right", "left", "top", "bottom", "top right", "bottom right", "top left", "bottom left")


def place_label(screens: list[Screen], spot: tuple[float, float], radius: float, text: str,
                size: float) -> dict | None:
    """A spot for the label (which starts with the pin's number) of the pin at `spot` (degrees) beside it:
    right, left, above, below, the corners, then right or left a row or more higher or lower (a crowd of pins:
    the labels stack up), that covers no pin and no label on every one of `screens` (a phone's map and a
    desktop's: a label is shifted in px, its pin placed in degrees); plotly annotation anchors and shifts in
    px, or None when there is none."""
    width, height = _text_width(text, size) + 8, size + 8
    gap = radius + 2
    candidates = [(side, 0.0) for side in LABEL_SIDES] + [
        (side, rows * height) for rows in (-1, 1, -2, 2, -3, 3, -4, 4) for side in ("right", "left")] + [
        ("top", -rows * height) for rows in (1, 2, 3)] + [("bottom", rows * height) for rows in (1, 2, 3)]
    for side, lift in candidates:
        dx = gap if "right" in side else -gap if "left" in side else 0
        dy = (-gap if "top" in side else gap if "bottom" in side else 0) + lift
        boxes = []
        for screen in screens:
            px, py = screen.px(*spot)
            left = px + dx if "right" in side else px + dx - width if "left" in side else px - width / 2
            top = py + dy - height if "top" in side else py + dy if "bottom" in side else py + dy - height / 2
            boxes.append((left, top, left + width, top + height))
        if all(screen.free_box(box) for screen, box in zip(screens, boxes)):
            for screen, box in zip(screens, boxes):
                screen.boxes.append(box)
            return dict(xanchor="left" if "right" in side else "right" if "left" in side else "center",
                        yanchor="bottom" if "top" in side else "top" if "bottom" in side else "middle",
                        xshift=dx, yshift=-dy)
    for distance in (50, 75, 100, 130, 160):  # farther out, with a line to the pin
        for angle in np.radians([30, 150, 210, 330, 90, 270, 0, 180, 60, 120, 240, 300]):
            ax, ay = distance * math.cos(angle), -distance * math.sin(angle)
            boxes = []
            for screen in screens:
                px, py = screen.px(*spot)
                boxes.append((px + ax - width / 2, py + ay - height / 2, px + ax + width / 2, py + ay + height / 2))
            if all(screen.free_box(box) for screen, box in zip(screens, boxes)):
                for screen, box in zip(screens, boxes):
                    screen.boxes.append(box)
                return dict(showarrow=True, ax=ax, ay=ay, arrowhead=0, arrowwidth=1, arrowcolor="#444",
                            standoff=radius)
    return None


def country_name_trace(screens: list[Screen], x_range, y_range, centre: float) -> go.Scatter | None:
    """The names of the countries in view that are large enough on the map to hold them, largest first, where
    they cover no pin, no pin label and no other name."""
    names, xs, ys = [], [], []
    for name, longitude, latitude, area in country_labels():
        x = wrap_longitudes([longitude], centre)[0]
        if not (x_range[0] < x < x_range[1] and y_range[0] < latitude < y_range[1]):
            continue
        width, height = _text_width(name, COUNTRY_FONT), COUNTRY_FONT + 2
        wide = screens[-1]
        if area * wide.scale ** 2 * wide.ratio < width * height:  # the country holds its name on a desktop
            continue
        boxes = [(px - width / 2, py - height / 2, px + width / 2, py + height / 2)
                 for px, py in (screen.px(x, latitude) for screen in screens)]
        if all(screen.free_box(box) for screen, box in zip(screens, boxes)):
            for screen, box in zip(screens, boxes):
                screen.boxes.append(box)
            names.append(name)
            xs.append(x)
            ys.append(latitude)
        if len(names) >= MAX_COUNTRY_LABELS:
            break
    if not names:
        return None
    return go.Scatter(x=xs, y=ys, mode="text", text=[html.escape(name) for name in names], name="country names",
                      textfont=dict(color="#4a4a4a", size=COUNTRY_FONT,
                                    shadow="0 0 2px white, 0 0 2px white"),
                      hoverinfo="skip", showlegend=False)


def empty_map() -> PlotData:
    """The world before any answer (drawn at page load, so that the first answer only updates it)."""
    x_range, y_range = [-180, 180], [-58, 84]
    figure = go.Figure(layout=_base_layout(x_range, y_range, True))
    for trace in line_traces(x_range, y_range, 0.0):
        figure.add_trace(trace)
    countries = country_name_trace(map_screens(x_range, y_range, True), x_range, y_range, 0.0)
    if countries is not None:
        figure.add_trace(countries)
    figure.update_layout(showlegend=False)
    return _plot(figure)


def pin_label(row: dict) -> str:
    """A pin's name on the map, after its rank: the place in words when short, else its town (when the place
    names one) or its country or sea; the table has the full name."""
    if len(row["phrase"]) <= 20:
        name = row["phrase"]
    elif row["place"] and row["place"] in row["phrase"] and len(row["place"]) <= 20:
        name = row["place"]
    else:
        name = row["area"]
    return f"{row['rank']} · {name}"


def world_map(answer: Answer, cell_tokens: list[str] | None = None) -> PlotData:
    """The answer on the map: numbered pins (best on top), each named beside it where that covers nothing
    (a pin that would cover another is moved aside, with a line to its guess), the true location of an
    example, the country names in view, and the uncertainty layer (heat, or GeoHier's cells when
    `cell_tokens` name the uncertainty points' cells)."""
    result = answer.result
    latitudes, longitudes = result.latitudes, result.longitudes
    truth = answer.truth
    shown_lat = np.append(latitudes, truth.latitude) if truth else latitudes
    shown_lon = np.append(longitudes, truth.longitude) if truth else longitudes
    centre = frame_centre(shown_lon)
    xs = wrap_longitudes(longitudes, centre)
    x_range, y_range, world = view_ranges(shown_lat, wrap_longitudes(shown_lon, centre), centre)
    layout = _base_layout(x_range, y_range, world)
    figure = go.Figure()
    _add_uncertainty(figure, layout, result.uncertainty, cell_tokens, centre)
    for trace in line_traces(x_range, y_range, centre):
        figure.add_trace(trace)
    rows = answer.rows()
    screens = map_screens(x_range, y_range, world)
    truth_x = wrap_longitudes([truth.longitude], centre)[0] if truth else None
    if truth:
        for screen in screens:
            screen.circles.append((*screen.px(truth_x, truth.latitude), 12.0))
    spots = place_pins(screens[0], xs, latitudes)  # apart on the phone's map: further apart on larger ones
    for screen in screens[1:]:
        screen.circles += [(*screen.px(*spot), radius) for spot, (_, _, radius) in zip(spots, screens[0].circles[
            len(screens[0].circles) - len(spots):])]
    labels = [place_label(screens, spot, PIN_RADIUS[0] if rank == 0 else PIN_RADIUS[1], pin_label(row),
                          LABEL_FONT + (1 if rank == 0 else 0))
              for rank, (spot, row) in enumerate(zip(spots, rows))]
    countries = country_name_trace(screens, x_range, y_range, centre)
    if countries is not None:
        figure.add_trace(countries)
    if truth:
        figure.add_trace(go.Scatter(
            x=[truth_x, xs[0]], y=[truth.latitude, latitudes[0]], mode="lines", hoverinfo="skip",
            line=dict(color=TRUTH_COLOUR, width=2, dash="dot"), showlegend=False, name="error"))
    _add_pins(figure, rows, spots, xs, latitudes)
    if truth:
        figure.add_trace(go.Scatter(
            x=[truth_x], y=[truth.latitude], mode="markers",
            name="True location", hovertemplate=f"True location: {html.escape(truth.label)}<extra></extra>",
            marker=dict(symbol="star", size=22, color=TRUTH_COLOUR, line=dict(color="white", width=1.5))))
    layout["annotations"] = [
        dict(dict(x=spot[0], y=spot[1], xref="x", yref="y", showarrow=False), text=html.escape(pin_label(row)),
             font=dict(size=LABEL_FONT + (1 if row["rank"] == 1 else 0), color="#1a1a1a"),
             bgcolor="rgba(255,255,255,0.85)", borderpad=2, name=f"pin-label-{row['rank']}", **label)
        for spot, row, label in zip(spots, rows, labels) if label is not None
    ]
    layout["updatemenus"] = [_view_buttons(x_range, y_range, centre)]
    figure.update_layout(**layout)
    return _plot(figure)


def _add_uncertainty(figure: go.Figure, layout: dict, uncertainty, cell_tokens, centre: float) -> None:
    """The uncertainty layer: GeoHier's cells when `cell_tokens` name them, else a heat raster of the points."""
    if uncertainty is not None and cell_tokens is not None:
        for trace in cell_traces(cell_tokens, uncertainty[:, 2], centre):
            figure.add_trace(trace)
        figure.add_trace(_legend_entry("Predicted cells", "square", "rgba(240,59,32,0.6)"))
    elif uncertainty is not None:
        heat = heat_layer(uncertainty, centre)
        if heat is not None:
            layout["images"].append(heat)
            figure.add_trace(_legend_entry("Probability", "square", "rgba(240,59,32,0.8)"))


def _add_pins(figure: go.Figure, rows: list[dict], spots, xs, latitudes) -> None:
    """Numbered pins at `spots` (best on top), and a line from each pin moved aside to a dot at its guess."""
    hover = [[row["rank"], html.escape(row["phrase"]), format_percent(row["probability"]),
              format_coordinates(row["latitude"], row["longitude"])] for row in rows]
    template = "<b>#%{customdata[0]}</b> %{customdata[1]}<br>%{customdata[2]} · %{customdata[3]}<extra></extra>"
    moved = [rank for rank, (spot, x, y) in enumerate(zip(spots, xs, latitudes))
             if abs(spot[0] - x) > 1e-9 or abs(spot[1] - y) > 1e-9]
    if moved:
        line_x = [v for rank in moved for v in (xs[rank], spots[rank][0], None)]
        line_y = [v for rank in moved for v in (latitudes[rank], spots[rank][1], None)]
        figure.add_trace(go.Scatter(x=line_x, y=line_y, mode="lines+markers", hoverinfo="skip", showlegend=False,
                                    name="moved-pins", line=dict(color="#333", width=1),
                                    marker=dict(size=[5, 0, 0] * len(moved), color="#333")))
    spot_x, spot_y = np.array([spot[0] for spot in spots]), np.array([spot[1] for spot in spots])
    others = slice(len(rows) - 1, 0, -1)  # ranks k..2: rank 2 drawn over rank 3, ...
    if len(rows) > 1:
        figure.add_trace(go.Scatter(
            x=spot_x[others], y=spot_y[others], mode="markers+text", name=f"Guesses 2–{len(rows)}",
            text=[str(rank) for rank in range(len(rows), 1, -1)], textposition="middle center",
            textfont=dict(color="white", size=11), customdata=hover[others], hovertemplate=template,
            marker=dict(size=21, color=OTHER_COLOUR, line=dict(color="white", width=1.5))))
    figure.add_trace(go.Scatter(
        x=spot_x[:1], y=spot_y[:1], mode="markers+text", name="Best guess", text=["1"],
        textposition="middle center", textfont=dict(color="white", size=14), customdata=hover[:1],
        hovertemplate=template, marker=dict(size=30, color=BEST_COLOUR, line=dict(color="white", width=2))))


def _view_buttons(x_range, y_range, centre: float) -> dict:
    """The "Answer" / "World" view buttons; labels of three lines (blank, name, blank) make them 44 px or taller,
    for fingers."""
    world_x = [centre - 180, centre + 180]
    return dict(
        type="buttons", direction="right", x=0.0, y=1.0, xanchor="left", yanchor="top", showactive=False,
        bgcolor="white", bordercolor="#999", font=dict(size=12), pad=dict(l=4, r=4, t=4, b=4),
        buttons=[dict(label="<br>Answer<br> ", method="relayout", args=[{"xaxis.range": x_range, "yaxis.range": y_range}]),
                 dict(label="<br>World<br> ", method="relayout", args=[{"xaxis.range": world_x, "yaxis.range": [-58, 84]}])],
    )


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
    where = f"in <b>{html.escape(in_words(country, country in answer.water))}</b>"
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


def osm_url(latitude: float, longitude: float, zoom: int = 8) -> str:
    """OpenStreetMap at a point (a plain link: nothing is loaded from it until it is clicked)."""
    return (f"https://www.openstreetmap.org/?mlat={latitude:.5f}&mlon={longitude:.5f}"
            f"#map={zoom}/{latitude:.5f}/{longitude:.5f}")


def details_html(answer: Answer, share_query: str, share_note: str = "") -> str:
    """Below the map: the top-k table (rank, place with coordinates, probability, a link to OpenStreetMap), the
    country roll-up, the share link (with `share_note` beside it) and the downloads (CSV, GeoJSON)."""
    best_probability = answer.rows()[0]["probability"] or 1.0
    body = "".join(
        f"<tr><td class='r'><span class='rank{' best' if row['rank'] == 1 else ''}'>{row['rank']}</span></td>"
        f"<td class='place'>{html.escape(row['phrase'])}"
        f"<span class='coords'>{format_coordinates(row['latitude'], row['longitude'])}</span>"
        f"<a class='osm-inline' href='{html.escape(osm_url(row['latitude'], row['longitude']))}' target='_blank' "
        f"rel='noopener noreferrer'>Open in OpenStreetMap</a></td>"
        f"<td class='p'><span class='bar' style='width:{40 * row['probability'] / best_probability:.0f}px'>"
        f"</span>{format_percent(row['probability'])}</td>"
        f"<td class='osm'><a class='osm-link' href='{html.escape(osm_url(row['latitude'], row['longitude']))}' "
        f"target='_blank' rel='noopener noreferrer' title='Open guess {row['rank']} in OpenStreetMap'>"
        "Open in OpenStreetMap</a></td></tr>"
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
    note = f"<div id='share-note' class='share-note'>{html.escape(share_note)}</div>" if share_note else ""
    return (
        "<div id='answer-details' class='answer-details'>"
        f"<table id='top-k-table' class='topk'><thead><tr><th>#</th><th>Place</th><th>Probability</th>"
        f"<th class='osm'>Map</th></tr></thead><tbody>{body}</tbody></table>"
        f"<div id='countries' class='countries'>By country or sea: {countries}</div>"
        "<div class='actions'>"
        f"<a id='share-link' class='action' href='?{html.escape(share_query)}' target='_top'>Share link</a>"
        f"<button type='button' id='copy-link' class='action' onclick=\"{html.escape(copy)}\">Copy link</button>"
        f"<a id='download-csv' class='action' href='{csv_url}' download='where-is-this.csv'>Download CSV</a>"
        f"<a id='download-geojson' class='action' href='{geojson_url}' download='where-is-this.geojson'>"
        f"Download GeoJSON</a></div>{note}</div>"
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
.topk td.osm, .topk th.osm { white-space: nowrap; width: 1%; }
.topk .osm-link { font-size: .82rem; color: #1f4e9c; }
.actions { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0 2px; }
.actions .action { display: inline-flex; align-items: center; min-height: 44px; box-sizing: border-box;
                   padding: 4px 14px; border: 1px solid #bbb; border-radius: 6px;
                   text-decoration: none; color: inherit; background: white; cursor: pointer;
                   font: inherit; font-size: .9rem; font-weight: 400; line-height: 1.3; }
.share-note { font-size: .85rem; color: #555; margin: 4px 2px; }
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
#back-to-inputs { display: none; align-items: center; min-height: 44px; padding: 4px 14px; margin: 8px 0;
                  border: 1px solid #bbb; border-radius: 6px; background: white; color: inherit;
                  text-decoration: none; font-size: .9rem; }
.topk .osm-inline { display: none; }
#model-row { align-items: center; flex-wrap: wrap; }
#model-row > * { flex: 1 1 300px; min-width: min(100%, 300px); }
#model-note { font-size: .85rem; color: #8a4b00; }
#model-note p { margin: 0; }
@media (max-width: 768px) {
  #main-row.answered #results-column { order: -1; }
  .answer-summary .headline { font-size: 1.25rem; }
  #world-map .modebar-container { display: none; }  /* no toolbar over a small map: pinch to zoom */
  .topk td.osm, .topk th.osm { display: none; }  /* the link goes under the place instead */
  .topk .osm-inline { display: flex; align-items: center; justify-content: flex-start; min-height: 44px;
                      font-size: .8rem; color: #1f4e9c; white-space: nowrap; text-align: left; }
  .topk td.place .coords { display: block; margin-left: 0; }
  #back-to-inputs { display: inline-flex; }
}
"""
