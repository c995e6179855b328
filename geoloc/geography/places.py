"""Where a point is, in words: the country or the sea it lies in, and the nearest town when it is near.

The one home of place naming in the package: `GeolocationResult.places` (`Geolocator.locate_*(places=True)`),
`geoloc predict --places` and the Space use `describe_places`; the Space's map draws its coastlines, borders
and country names from the same shapes (`map_lines`, `country_labels`).

- Countries (Antarctica included) by point-in-polygon over Natural Earth's 1:50m admin-0 countries (public
  domain; the `world-atlas` 2.0.2 TopoJSON, Natural Earth 4.1.0, shipped in `assets/naturalearth/`), under
  current short names ("North Macedonia", "Eswatini", "DR Congo", "North Korea"): `COUNTRY_NAMES`.
- Water by point-in-polygon over Natural Earth's 1:50m marine polygons (oceans, seas, gulfs, straits; the
  most specific one that holds the point: the Adriatic Sea rather than the Mediterranean), for points in no
  country; a point in a gap between the two layers (a coastline drawn differently) takes the nearest water.
- The nearest town from the offline GeoNames gazetteer (`reverse_geocode`), named only when it is within
  `NEAR_KM` and in the same country (for water: within `OFF_KM`), so that no answer says "833 km from ...".

Needs `shapely` and `reverse_geocode` (the `space` extra); a clear `ValueError` says so when they are missing.

Example:
    >>> describe_places([47.37, 42.0, -80.0], [8.54, 16.0, 0.0])[0]["name"]  # doctest: +SKIP
    'Zurich, Switzerland'
"""

import json
from functools import lru_cache
from importlib import resources

import numpy as np

from .geodesy import geodesic_distance_km

NEAR_KM = 25  # a town this close is where the point is ("Zernez, Switzerland")
AROUND_KM = 100  # ... this close, the point is "near" it
OFF_KM = 100  # water this close to a town is "off" it
COUNTRIES_FILE = "countries-50m.json"
SEAS_FILE = "seas-50m.json"
# Natural Earth's abbreviated or dated names (its NAME field) -> current short names in English.
COUNTRY_NAMES = {
    "Antigua and Barb.": "Antigua and Barbuda", "Ashmore and Cartier Is.": "Ashmore and Cartier Islands",
    "Bosnia and Herz.": "Bosnia and Herzegovina", "Br. Indian Ocean Ter.": "British Indian Ocean Territory",
    "British Virgin Is.": "British Virgin Islands", "Cayman Is.": "Cayman Islands",
    "Central African Rep.": "Central African Republic", "Cook Is.": "Cook Islands", "Dem. Rep. Congo": "DR Congo",
    "Dominican Rep.": "Dominican Republic", "Eq. Guinea": "Equatorial Guinea", "Faeroe Is.": "Faroe Islands",
    "Falkland Is.": "Falkland Islands", "Fr. Polynesia": "French Polynesia",
    "Fr. S. Antarctic Lands": "French Southern Territories", "Heard I. and McDonald Is.": "Heard and McDonald Islands",
    "Indian Ocean Ter.": "Christmas and Cocos Islands", "Macedonia": "North Macedonia", "Marshall Is.": "Marshall Islands",
    "N. Cyprus": "Northern Cyprus", "N. Mariana Is.": "Northern Mariana Islands", "Pitcairn Is.": "Pitcairn Islands",
    "S. Geo. and the Is.": "South Georgia and the South Sandwich Islands", "S. Sudan": "South Sudan",
    "Solomon Is.": "Solomon Islands", "St-Barthélemy": "Saint Barthélemy", "St-Martin": "Saint Martin",
    "St. Kitts and Nevis": "Saint Kitts and Nevis", "St. Pierre and Miquelon": "Saint Pierre and Miquelon",
    "St. Vin. and Gren.": "Saint Vincent and the Grenadines", "Turks and Caicos Is.": "Turks and Caicos Islands",
    "U.S. Virgin Is.": "U.S. Virgin Islands", "United States of America": "United States",
    "W. Sahara": "Western Sahara", "Wallis and Futuna Is.": "Wallis and Futuna", "eSwatini": "Eswatini",
    "Congo": "Republic of the Congo",
}


def _asset(name: str):
    with resources.files("geoloc").joinpath("assets", "naturalearth", name).open("rb") as handle:
        return json.load(handle)


def _shapely():
    try:
        import shapely
    except ImportError:
        raise ValueError("Place names need the shapely package: pip install shapely (or geoloc[space]).") from None
    return shapely


@lru_cache(maxsize=1)
def _topology() -> tuple[list[np.ndarray], list[tuple[str, list]]]:
    """The shipped TopoJSON decoded: its arcs as (n, 2) arrays of (longitude, latitude), and each country's name
    with its polygons as lists of rings, each ring a list of signed arc indices (TopoJSON's ~i: reversed)."""
    topology = _asset(COUNTRIES_FILE)
    (scale_x, scale_y), (shift_x, shift_y) = topology["transform"]["scale"], topology["transform"]["translate"]
    arcs = []
    for arc in topology["arcs"]:
        steps = np.cumsum(np.asarray(arc, dtype=np.float64), axis=0)
        arcs.append(np.column_stack([steps[:, 0] * scale_x + shift_x, steps[:, 1] * scale_y + shift_y]))
    countries = []
    for geometry in topology["objects"]["countries"]["geometries"]:
        polygons = ([geometry["arcs"]] if geometry["type"] == "Polygon"
                    else geometry["arcs"] if geometry["type"] == "MultiPolygon" else [])
        name = geometry.get("properties", {}).get("name", "")
        countries.append((COUNTRY_NAMES.get(name, name), polygons))
    return arcs, countries


def _ring(arcs: list[np.ndarray], indices: list[int]) -> np.ndarray:
    parts = [arcs[i] if i >= 0 else arcs[~i][::-1] for i in indices]
    return np.concatenate([parts[0]] + [part[1:] for part in parts[1:]])


def _planar_ring(ring: np.ndarray) -> np.ndarray:
    """A ring drawn on the sphere as one on the plate carree plane: longitudes made continuous across the
    antimeridian (they may then leave [-180, 180]); a ring around a pole (Antarctica) closed along the pole."""
    ring = np.column_stack([np.unwrap(ring[:, 0], period=360), ring[:, 1]])
    if abs(ring[-1, 0] - ring[0, 0]) > 180:
        pole = -90.0 if ring[:, 1].mean() < 0 else 90.0
        ring = np.concatenate([ring, [[ring[-1, 0], pole], [ring[0, 0], pole]], ring[:1]])
    return ring


def _polygon(shapely, rings: list[np.ndarray]):
    """A polygon from its rings on the sphere, cut at the antimeridian into parts within [-180, 180]."""
    polygon = shapely.make_valid(shapely.Polygon(_planar_ring(rings[0]), [_planar_ring(r) for r in rings[1:]]))
    west, _, east, _ = polygon.bounds
    if west >= -180 and east <= 180:
        return [polygon]
    world = shapely.box(-180, -90, 180, 90)
    parts = []
    for shift in (-360, 0, 360):
        piece = shapely.intersection(shapely.transform(polygon, lambda xy, s=shift: xy + [s, 0]), world)
        parts += [g for g in getattr(piece, "geoms", [piece]) if g.geom_type == "Polygon" and g.area > 0]
    return parts


@lru_cache(maxsize=1)
def _countries():
    """(names, shapely geometries, STRtree) of the countries."""
    shapely = _shapely()
    arcs, countries = _topology()
    names, geometries = [], []
    for name, polygons in countries:
        parts = [part for rings in polygons for part in _polygon(shapely, [_ring(arcs, ring) for ring in rings])]
        names.append(name)
        geometries.append(shapely.MultiPolygon(parts))
    return names, geometries, shapely.STRtree(geometries)


@lru_cache(maxsize=1)
def _seas():
    """(names, shapely geometries, STRtree) of the water bodies, smallest first."""
    shapely = _shapely()
    names, geometries = [], []
    for sea in _asset(SEAS_FILE)["seas"]:
        parts = [shapely.Polygon(rings[0], rings[1:]) for rings in sea["polygons"]]
        names.append(sea["name"])
        geometries.append(shapely.make_valid(shapely.MultiPolygon(parts)))
    return names, geometries, shapely.STRtree(geometries)


def _first_hit(tree, points, count: int) -> np.ndarray:
    """For each point, the lowest index of a tree geometry that holds it (-1 where none does)."""
    found = np.full(count, np.iinfo(np.int64).max)
    inputs, hits = tree.query(points, predicate="within")
    np.minimum.at(found, inputs, hits)
    return np.where(found == np.iinfo(np.int64).max, -1, found)


def areas(latitudes, longitudes) -> tuple[list[str], np.ndarray]:
    """The country (or Antarctica) each point lies in, else the water body it lies in, and whether it is water:
    `(names, water)` with `water` an (N,) bool array. Longitudes are taken modulo 360."""
    shapely = _shapely()
    latitudes = np.clip(np.asarray(latitudes, dtype=np.float64).ravel(), -89.999, 89.999)  # the poles: inside
    longitudes = (np.asarray(longitudes, dtype=np.float64).ravel() + 180) % 360 - 180
    points = shapely.points(longitudes, latitudes)
    country_names, _, country_tree = _countries()
    country = _first_hit(country_tree, points, len(points))
    water = country < 0
    names = [country_names[i] if i >= 0 else "" for i in country]
    if water.any():
        sea_names, _, sea_tree = _seas()
        wet = np.flatnonzero(water)
        sea = _first_hit(sea_tree, points[wet], len(wet))
        gaps = np.flatnonzero(sea < 0)
        if len(gaps):  # between a coastline of the countries and one of the seas: the nearest water
            inputs, nearest = sea_tree.query_nearest(points[wet[gaps]], all_matches=False)
            sea[gaps[inputs]] = nearest
        for index, sea_index in zip(wet, sea):
            names[index] = sea_names[sea_index]
    return names, water


def _towns(latitudes, longitudes) -> list[dict]:
    """The nearest populated place of each point (GeoNames via `reverse_geocode`) with the distance (km)."""
    try:
        import reverse_geocode
    except ImportError:
        raise ValueError("Place names need the reverse_geocode package: pip install reverse_geocode "
                         "(or geoloc[space]).") from None
    found = reverse_geocode.search(list(zip(latitudes, longitudes)))
    distances = geodesic_distance_km(latitudes, longitudes, [p["latitude"] for p in found],
                                     [p["longitude"] for p in found])
    return [{"town": p["city"], "latitude": p["latitude"], "longitude": p["longitude"], "km": float(km)}
            for p, km in zip(found, distances)]


def in_words(area: str, water: bool) -> str:
    """An area after "in": "Switzerland", "the North Sea" ("the" before water bodies that take it)."""
    if water and not area.startswith(("Golf", "Bahía", "Río", "The ")):
        return f"the {area}"
    return area


def describe_places(latitudes, longitudes) -> list[dict]:
    """Each point in words, as a dict:

    - `name`: for people: "Zernez, Switzerland" (a town within `NEAR_KM`), "near Zernez, Switzerland" (within
      `AROUND_KM`), "Switzerland", "Antarctica", "Adriatic Sea", "Adriatic Sea, 40 km off Split, Croatia";
    - `area`: the country, or the water body, the point lies in; `water`: whether it is water;
    - `country`: the country (None over water);
    - `place`, `km`: the nearest town (GeoNames) and the geodesic distance to it; `place_country`: the country
      the town lies in (by the same polygons, so never a dated name).

    Raises:
        ValueError: when `shapely` or `reverse_geocode` is not installed.
    """
    latitudes = np.asarray(latitudes, dtype=np.float64).ravel()
    longitudes = np.asarray(longitudes, dtype=np.float64).ravel()
    if not len(latitudes):
        return []
    names, water = areas(latitudes, longitudes)
    towns = _towns(latitudes, longitudes)
    town_areas, town_water = areas([t["latitude"] for t in towns], [t["longitude"] for t in towns])
    described = []
    for name, wet, town, town_area, town_wet in zip(names, water, towns, town_areas, town_water):
        town_country = None if town_wet else town_area
        if wet:
            near = town["km"] <= OFF_KM and town_country
            words = f"{name}, {town['km']:,.0f} km off {town['town']}, {town_country}" if near else name
        elif town_country == name and town["km"] < NEAR_KM:
            words = f"{town['town']}, {name}"
        elif town_country == name and town["km"] < AROUND_KM:
            words = f"near {town['town']}, {name}"
        else:
            words = name
        described.append({"name": words, "area": name, "water": bool(wet), "country": None if wet else name,
                          "place": town["town"], "place_country": town_country, "km": town["km"]})
    return described


@lru_cache(maxsize=1)
def map_lines() -> dict[str, list[np.ndarray]]:
    """The coastlines and the land borders to draw, as lists of (n, 2) arrays of (longitude, latitude): an arc
    of the countries' topology that bounds one country is coast, one shared by two is a border. The cuts along
    the antimeridian and the South Pole are left out, and a line that crosses the antimeridian is split there."""
    arcs, countries = _topology()
    uses = np.zeros(len(arcs), dtype=int)
    for _, polygons in countries:
        for rings in polygons:
            for ring in rings:
                for index in ring:
                    uses[index if index >= 0 else ~index] += 1
    lines = {"coast": [], "borders": []}
    for arc, count in zip(arcs, uses):
        kind = "coast" if count == 1 else "borders"
        seam = (np.abs(arc[:, 0]) > 179.99) | (arc[:, 1] < -89.99)
        cut = seam[1:] & seam[:-1]  # a segment along the antimeridian or the pole: not a real line ...
        cut |= np.abs(np.diff(arc[:, 0])) > 180  # ... nor one across the antimeridian (drawn on both sides)
        start = 0
        for end in [*np.flatnonzero(cut) + 1, len(arc)]:
            if end - start >= 2:
                lines[kind].append(arc[start:end])
            start = end
    return lines


@lru_cache(maxsize=1)
def country_labels() -> list[tuple[str, float, float, float]]:
    """Where to write each country's name: `(name, longitude, latitude, area)` at the pole of inaccessibility
    of its largest part (inside it, away from its edges), `area` in square degrees of that part; largest first."""
    shapely = _shapely()
    names, geometries, _ = _countries()
    labels = []
    for name, geometry in zip(names, geometries):
        parts = list(getattr(geometry, "geoms", [geometry]))
        polygons = [part for part in parts if part.geom_type == "Polygon"]
        if not polygons:
            continue
        largest = max(polygons, key=lambda polygon: polygon.area)
        point = shapely.ops.polylabel(largest, tolerance=0.2) if hasattr(shapely, "ops") else largest.centroid
        labels.append((name, float(point.x), float(point.y), float(largest.area)))
    return sorted(labels, key=lambda label: -label[3])


__all__ = ["COUNTRY_NAMES", "areas", "country_labels", "describe_places", "in_words", "map_lines"]
