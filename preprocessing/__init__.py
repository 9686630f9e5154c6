"""Offline preprocessing: one builder per raw corpus; a runner renders, encodes and writes shards.

    evav preprocess BUILDER --src RAW --out DIR [--workers N] [--num-parts N --part I]

builders/   one module per corpus (the registry finds them; see README.md, "Adding a builder")
runner.py   work split over workers and parts, rendering + encoding, quarantine, resume
shards.py   writing one tar shard atomically and reproducibly
layout.py   where a build keeps its files (shards, records, plan) inside DIR
merge.py    shard records -> DIR/manifest.json (schema: evav/manifest.py)
inspect.py  `evav inspect`: counts, frame histogram, codec, contact sheets
cli.py      the two subcommands
"""
