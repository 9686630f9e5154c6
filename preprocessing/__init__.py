"""Offline preprocessing: one builder per raw corpus; a runner renders, encodes and writes shards.

Arrives with the preprocessing issue (see DESIGN.md section 2, item 1).
"""
