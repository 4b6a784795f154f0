"""The on-disk format: where everything lives in a tree, ckpt-info.json, and the
append-only files (history.jsonl, index.jsonl) with the history's cache."""
