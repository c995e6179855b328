"""`geoloc.geography.places`: where a point is, in words, from the Natural Earth polygons shipped with the package (countries,
Antarctica, seas) and the nearest town only when it is near; the lines and labels the Space's map draws."""

import json
from importlib import resources

import numpy as np

from geoloc.geography.places import COUNTRY_NAMES, areas, country_labels, describe_places, in_words, map_lines


def test_countries_and_seas_by_point_in_polygon_with_current_short_names():
    points = {  # (latitude, longitude): what the point lies in
        (41.99, 21.43): "North Macedonia", (39.03, 125.75): "North Korea", (32.88, 13.19): "Libya",
        (-26.5, 31.5): "Eswatini", (-4.3, 15.3): "DR Congo", (-80.0, 0.0): "Antarctica",
        (-89.99, 120.0): "Antarctica", (71.0, -42.0): "Greenland", (65.0, 178.0): "Russia",
        (-17.8, 178.0): "Fiji", (40.7, -100.0): "United States", (42.5, 16.0): "Adriatic Sea",
        (56.0, 3.0): "North Sea", (35.0, 18.0): "Mediterranean Sea", (45.0, -30.0): "North Atlantic Ocean",
        (-30.0, -120.0): "South Pacific Ocean", (-62.0, 60.0): "Southern Ocean", (0.5, -150.0): "North Pacific Ocean",
    }
    names, water = areas([p[0] for p in points], [p[1] for p in points])
    assert dict(zip(points, names)) == points
    assert [bool(w) for w in water] == [name.endswith(("Sea", "Ocean")) for name in points.values()]
    assert areas([10.0], [370.0 - 360.0])[0] == areas([10.0], [370.0])[0]  # longitudes modulo 360
    shipped = json.loads(resources.files("geoloc").joinpath("assets", "naturalearth", "countries-50m.json")
                         .read_text())
    raw = {g["properties"]["name"] for g in shipped["objects"]["countries"]["geometries"]}
    assert set(COUNTRY_NAMES) <= raw  # every renamed name exists in the data
    for dated in ("Macedonia", "Libyan Arab Jamahiriya", "Korea, Democratic People's Republic of", "eSwatini"):
        assert dated not in {COUNTRY_NAMES.get(name, name) for name in raw}


def test_a_town_is_named_only_when_near_and_in_the_same_country():
    zurich, sahara, pacific, adriatic = describe_places([47.3769, 23.0, 10.0, 43.4], [8.5417, 10.0, -150.0, 16.2])
    assert zurich["name"].endswith(", Switzerland") and zurich["km"] < 25 and not zurich["name"].startswith("near")
    assert zurich["country"] == zurich["area"] == "Switzerland" and zurich["place_country"] == "Switzerland"
    assert sahara["name"] == "Algeria" and sahara["km"] > 100
    assert pacific["name"] == "North Pacific Ocean" and pacific["water"] and pacific["country"] is None
    assert adriatic["name"].startswith("Adriatic Sea") and adriatic["area"] == "Adriatic Sea"
    assert in_words("North Sea", True) == "the North Sea" and in_words("Italy", False) == "Italy"
    assert describe_places([], []) == []


def test_map_lines_and_labels():
    lines = map_lines()
    assert len(lines["coast"]) > 1000 and len(lines["borders"]) > 100
    for line in lines["coast"] + lines["borders"]:
        assert np.all(np.abs(line[:, 0]) <= 180) and np.all(np.abs(line[:, 1]) <= 90)
        vertical = (np.abs(line[1:, 0]) > 179.99) & (np.abs(line[:-1, 0]) > 179.99)
        assert not vertical.any()  # no seam along the antimeridian is drawn
        assert np.all(np.abs(np.diff(line[:, 0])) < 180)  # nor a line across the whole map
    labels = {name: (lon, lat) for name, lon, lat, _ in country_labels()}
    assert areas([labels["Chile"][1]], [labels["Chile"][0]])[0] == ["Chile"]  # inside, even for a thin country
    assert areas([labels["Italy"][1]], [labels["Italy"][0]])[0] == ["Italy"]
