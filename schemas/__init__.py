"""Package data: the JSON schemas of ckpt-info.json and of a list index line (installed
as candle_ckpt.schemas)."""
