"""The only place with threads, files and devices: readers, the arena, the executor, traces."""
