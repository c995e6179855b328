"""Build `geoloc/assets/naturalearth/seas-50m.json` from Natural Earth's 1:50m marine polygons (public domain).

    python scripts/build_natural_earth_seas.py ne_50m_geography_marine_polys.geojson

The source is `ne_50m_geography_marine_polys` (Natural Earth 4.x) as GeoJSON, e.g. from the
nvkelso/natural-earth-vector or martynafford/natural-earth-geojson repositories (CC0 conversions). Kept: the
oceans, seas, gulfs, bays, straits, channels and sounds (not rivers or reefs), their names tidied
("NORTH ATLANTIC OCEAN" -> "North Atlantic Ocean", double spaces removed), each simplified to 0.1 degree and
rounded to 0.01 degree (the names are what matters: land is named by the country polygons first). Written
smallest area first, so that the first polygon holding a point is the most specific name (the Adriatic Sea
before the Mediterranean). Needs shapely.
"""

import json
import re
import sys
from pathlib import Path

import shapely
from shapely.geometry import shape

KEPT = {"ocean", "sea", "gulf", "bay", "strait", "channel", "sound"}
OUTPUT = Path(__file__).resolve().parents[1] / "geoloc" / "assets" / "naturalearth" / "seas-50m.json"


def tidy(name: str) -> str:
    name = re.sub(r"\s+", " ", name).strip()
    return name.title() if name.isupper() else name


def main(source: str) -> None:
    features = json.loads(Path(source).read_text())["features"]
    seas = []
    for feature in features:
        if feature["properties"]["featurecla"] not in KEPT:
            continue
        geometry = shapely.set_precision(shape(feature["geometry"]).simplify(0.1), 0.01)
        if geometry.is_empty:
            continue
        polygons = [geometry] if geometry.geom_type == "Polygon" else list(geometry.geoms)
        rings = [[[[round(x, 2), round(y, 2)] for x, y in ring.coords]
                  for ring in (polygon.exterior, *polygon.interiors)] for polygon in polygons]
        seas.append((geometry.area, tidy(feature["properties"]["name"]), rings))
    seas.sort(key=lambda sea: sea[0])
    OUTPUT.write_text(json.dumps({
        "source": "Natural Earth 1:50m ne_50m_geography_marine_polys (public domain), simplified to 0.1 degree",
        "seas": [{"name": name, "polygons": rings} for _, name, rings in seas]}, separators=(",", ":")))
    print(f"{len(seas)} seas, {OUTPUT.stat().st_size / 1024:.0f} kB -> {OUTPUT}")


if __name__ == "__main__":
    main(sys.argv[1])
