"""Exporting one backbone: build -> trace the 'full' head once -> derive each mode's program ->
each format writes from what it is handed -> verify against eager -> record in the manifest;
the `verify` logic, flat parameters across formats, checkpoints and input preprocessing."""
