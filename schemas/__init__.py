"""Package data: the JSON schemas of ckpt-info.json (installed as candle_ckpt.schemas)."""
