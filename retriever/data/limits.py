"""Decoding limits, in a module of their own so that configs and the CLI can show them without
importing PIL or numpy."""

# Pixels a decode may produce (after JPEG draft scaling). A 12000×12000 PNG (144 MP, 140 KB on
# disk, under Pillow's own bomb error threshold) decoded at 1.58 GB peak RSS per worker; 64 MP
# keeps a worker's decode near 64M × 3 bytes × ~3 copies ≈ 0.6 GB. Measured in benchmarks/RESULTS.md.
DEFAULT_MAX_PIXELS = 64_000_000
