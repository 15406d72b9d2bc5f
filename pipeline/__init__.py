"""Ray Data stages and storage I/O around the corrdiff codec (which knows neither)."""
