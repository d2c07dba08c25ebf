"""The artifact store: the manifest (what an export directory holds, with the sha256 of every
file), atomic writes, the directory transaction and its lock, the flat-vector layout and the
tolerance bound every comparison with eager uses. Imports no other layer of `export`."""
