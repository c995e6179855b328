"""The Earth: WGS84 distances and coordinate checks for numpy callers (`geodesy`), S2 geocell hierarchies
(`geocells`, `geoloc geocells`)."""
