"""One module per on-disk format; `adapter.load` detects which one it was given."""
