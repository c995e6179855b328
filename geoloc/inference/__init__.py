"""Answers: the inference adapter every front end uses (`adapter`: `Geolocator` -> `GeolocationResult`), the
`geoloc predict` command with its dataset runs (`predict`), `geoloc evaluate` (`evaluate`) and the metrics
(`metrics`). `from geoloc import Geolocator` is the public way in."""
