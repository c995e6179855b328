"""Data in: geolocation datasets and their images (`dataset`), the standard benchmarks in their own layouts
(`benchmarks`), GeoCLIP's GPS galleries (`gallery`) and the world-map crops task (`worldmap`, `geoloc worldmap`)."""
