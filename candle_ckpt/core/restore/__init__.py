"""The restart path: which checkpoint to load, checking its files against its record,
and the restart flow every adapter shares."""
