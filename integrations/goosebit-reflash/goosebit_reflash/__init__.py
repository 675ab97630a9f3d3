"""gooseBit plugin for reflash bundles; the entry point is `goosebit_reflash.plugin` (loaded by gooseBit
while it starts, so this package itself imports nothing of gooseBit's)."""
