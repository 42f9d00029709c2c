"""Replay the NYC-taxi "high tip" pipeline into the ML monitoring store.

Modules, one concern each:

* ``tlc``: the TLC yellow-taxi file format (columns, types, codes, file names);
* ``zones``: taxi zones, boroughs, the congestion zone (shipped ``data/zones.csv``);
* ``generator``: synthetic Jan-May 2020 months with the spring-2020 drift (offline default);
* ``sources``: read real or generated months from paths or URLs, normalised, with clear errors;
* ``pipeline``: the essay's clean / featurize / label / train / score steps;
* ``replay``: predictions and delayed feedback records, written in backfill or live mode;
* ``__main__``: the command line, ``python -m loader --help``;
* ``demo``: ``make demo``, the datasource and this replay together.
"""
