"""Command line: ``python -m loader {generate,train,backfill,live,run} --help``.

The defaults make a self-contained demo: synthetic data at scale 0.005 (about 80k trips for
January to May 2020) is generated into ``$DATA_DIR`` if missing, the model is trained on January
if it is missing (recording a training event and the ``training`` drift reference), and the
replay writes to ``$DATABASE_URL`` (or the embedded PostgreSQL), or over HTTP with ``--url``.
Without a command, ``run`` backfills January-February and replays March onwards live.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import pandas as pd

from loader import generator, pipeline, replay, sources

DEFAULT_START, DEFAULT_UNTIL, DEFAULT_LIVE_FROM = "2020-01-01", "2020-06-01", "2020-03-01"
COMMANDS = ("generate", "train", "backfill", "live", "run")


# --------------------------------------------------------------------------------------------
# argument groups


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="working directory for generated files, downloads, models and the "
                        "embedded PostgreSQL (default: $DATA_DIR or ./.data)")
    g.add_argument("--source", action="append", default=None, metavar="SRC",
                   help="where trips come from, repeatable: 'generated' (default: synthetic "
                        "files in DATA_DIR, created if missing), 'tlc' (download the official "
                        "monthly parquet files), a directory of yellow_tripdata_YYYY-MM.parquet|"
                        "csv files, or such a file path or http(s) URL")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic generator and of the feedback draws (default 0)")
    g.add_argument("--scale", type=float, default=generator.DEFAULT_SCALE,
                   help="synthetic data size; 1.0 = the real volume (~6.4M trips in January) "
                        f"(default {generator.DEFAULT_SCALE})")
    g.add_argument("--stream", action="store_true",
                   help="generate synthetic months in memory instead of writing files")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-name", default=replay.MODEL_NAME,
                   help=f"name of the model in the store (default {replay.MODEL_NAME})")
    g.add_argument("--model-dir", type=Path, default=None,
                   help="where model.joblib and model.json live "
                        "(default DATA_DIR/models/MODEL_NAME)")
    g.add_argument("--train-month", default="2020-01",
                   help="month to train on, YYYY-MM (default 2020-01)")
    g.add_argument("--label-threshold", type=float, default=pipeline.LABEL_THRESHOLD,
                   help="a trip is a high tip if tip_amount / fare_amount exceeds this "
                        f"(default {pipeline.LABEL_THRESHOLD})")


def _store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("store")
    g.add_argument("--database-url", default=None,
                   help="PostgreSQL URL for the bulk COPY path (default $DATABASE_URL; if "
                        "unset, the embedded PostgreSQL in DATA_DIR)")
    g.add_argument("--url", default=None,
                   help="write over HTTP to this datasource server instead (default "
                        "$DATASOURCE_URL unless --database-url is given)")
    g.add_argument("--token", default=None,
                   help="bearer token for --url (default $INGEST_TOKEN)")
    g.add_argument("--dry-run", action="store_true",
                   help="build every record but write nothing (no database needed)")


def _replay_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replay")
    g.add_argument("--start", default=DEFAULT_START,
                   help=f"first pickup to replay; naive times are New York local time "
                        f"(default {DEFAULT_START})")
    g.add_argument("--until", default=DEFAULT_UNTIL,
                   help=f"stop at this data time, exclusive: no prediction or feedback at or "
                        f"after it is written (default {DEFAULT_UNTIL})")
    g.add_argument("--cash-feedback", choices=["label", "none"], default="label",
                   help="'label' (default, the essay's semantics): a cash trip's recorded tip "
                        "of 0 is its label; 'none': cash tips are unknown, no feedback")
    g.add_argument("--missing-feedback", type=float, default=0.03,
                   help="share of trips whose feedback never arrives (default 0.03)")
    g.add_argument("--delay", choices=["lognormal", "exponential", "fixed", "none"],
                   default="lognormal",
                   help="distribution of the feedback delay after drop-off (default lognormal)")
    g.add_argument("--delay-median", type=float, default=30.0,
                   help="median feedback delay in minutes (default 30)")
    g.add_argument("--delay-sigma", type=float, default=1.0,
                   help="lognormal shape of the delay (default 1.0)")
    g.add_argument("--batch-size", type=int, default=20_000,
                   help="records per client call (default 20000)")
    g.add_argument("--retrain", action="store_true",
                   help="train again even if a model exists in --model-dir")


def build_parser(prog: str = "python -m loader") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Replay the NYC-taxi 'high tip' pipeline (Jan-May 2020) into the ML "
                    "monitoring store: synthetic or real TLC data, a January-trained model, "
                    "predictions at pickup and delayed feedback.",
        epilog="Examples: 'python -m loader backfill' (all of Jan-May in under a minute), "
               "'python -m loader --speed 7200' (backfill Jan-Feb, then March onwards live), "
               "'python -m loader backfill --source tlc --train-month 2020-01' (real files).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                description="without a COMMAND, 'run' is implied")

    p = sub.add_parser("generate", help="write synthetic yellow_tripdata_2020-MM files",
                       description="Write synthetic TLC months (official schema) for 2020-01 "
                                   "to 2020-05; deterministic for --seed and --scale.")
    p.add_argument("--months", default="1-5",
                   help="months of 2020 to write: '1-5' or '1,2,3' (default 1-5)")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet",
                   help="file format (default parquet)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default DATA_DIR/taxi/synthetic-seedS-scaleX)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _data_args(p)

    p = sub.add_parser("train", help="train the January model and record the training event",
                       description="Clean, featurize and train the essay's RandomForest on one "
                                   "month; save model.joblib + model.json and record a "
                                   "'training' event for the model in the store.")
    _data_args(p)
    _model_args(p)
    _store_args(p)

    for name, text in (
            ("backfill", "write predictions and feedback as fast as possible"),
            ("live", "replay at --speed data-seconds per second, resuming after a restart"),
            ("run", "the default without a command: train if needed, backfill up to "
                    "--live-from, then replay live from there")):
        p = sub.add_parser(name, help=text, description=text + ".")
        _data_args(p)
        _model_args(p)
        _replay_args(p)
        _store_args(p)
        if name != "live":
            p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
            p.add_argument("--rewrite", action="store_true",
                           help="write every backfill month again; by default the months before "
                                "the model's latest stored prediction are skipped (a backfill "
                                "writes in time order, so those are complete)")
        if name != "backfill":
            p.add_argument("--speed", type=float, default=3600.0,
                           help="data seconds per wall second (default 3600: an hour a second)")
            p.add_argument("--tick", type=float, default=1.0,
                           help="seconds between writes (default 1)")
        if name == "run":
            p.add_argument("--live-from", default=DEFAULT_LIVE_FROM,
                           help="backfill before this data time, replay live from it "
                                f"(default {DEFAULT_LIVE_FROM}); skipped backfill when the store "
                                "already holds later predictions")
    return parser


# --------------------------------------------------------------------------------------------
# helpers


def data_dir(args) -> Path:
    """--data-dir, else $DATA_DIR, else ./.data; exported so the embedded database agrees."""
    if args.data_dir is not None:
        os.environ["DATA_DIR"] = str(args.data_dir)
        return Path(args.data_dir)
    return Path(os.environ.get("DATA_DIR", ".data"))


def synthetic_dir(args) -> Path:
    return data_dir(args) / "taxi" / f"synthetic-seed{args.seed}-scale{args.scale:g}"


def source_id(args) -> str:
    src = args.source or ["generated"]
    if src == ["generated"]:
        return f"generated seed={args.seed} scale={args.scale:g}"
    return " ".join(map(str, src))


def parse_months(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def month_inputs(args, wanted: list[tuple[int, int]]) -> list[replay.MonthInput]:
    """The months in ``wanted`` from the selected source, in order (lazy loaders)."""
    src = args.source or ["generated"]
    cache = data_dir(args) / "downloads"
    if src == ["generated"]:
        months = [m for y, m in wanted if y == generator.YEAR and m in generator.OFFICIAL_TRIPS]
        if args.stream:
            return [replay.MonthInput(generator.YEAR, m, partial(_generated, m, args.scale,
                                                                 args.seed)) for m in months]
        paths = generator.generate(synthetic_dir(args), months, scale=args.scale, seed=args.seed)
        return [replay.MonthInput(generator.YEAR, m, partial(sources.read_trips, p))
                for m, p in zip(months, paths, strict=True)]
    if src == ["tlc"]:
        src = [sources.official_urls(y, [m])[0] for y, m in wanted]
    files = [f for f in sources.discover(src) if (f.year, f.month) in wanted]
    return [replay.MonthInput(f.year, f.month, partial(sources.read_trips, f.location, cache))
            for f in files]


def _generated(month: int, scale: float, seed: int) -> pd.DataFrame:
    return sources.normalize(generator.generate_month(month, scale=scale, seed=seed),
                             origin=f"generated 2020-{month:02d}")


def months_between(start: pd.Timestamp, until: pd.Timestamp) -> list[tuple[int, int]]:
    """(year, month) pairs touching [start, until) in New York time."""
    lo = start.tz_convert(replay.NEW_YORK).tz_localize(None).to_period("M")
    hi = (until.tz_convert(replay.NEW_YORK).tz_localize(None) - pd.Timedelta(microseconds=1)
          ).to_period("M")
    return [(p.year, p.month) for p in pd.period_range(lo, hi, freq="M")]


def model_dir(args) -> Path:
    return args.model_dir or data_dir(args) / "models" / args.model_name


def open_client(args):
    """The store client: HTTP with --url, else the bulk path; None with --dry-run."""
    if getattr(args, "dry_run", False):
        return None
    try:
        from datasource.client import Client
    except ImportError as exc:
        sys.exit(f"error: the store client (datasource.client) is unavailable: {exc}; "
                 "use --dry-run to build records without writing")
    url = args.url or (None if args.database_url else os.environ.get("DATASOURCE_URL"))
    if url:
        return Client.remote(url, token=args.token or os.environ.get("INGEST_TOKEN"))
    return Client.local(database_url=args.database_url)  # None: $DATABASE_URL or embedded


def train_model(args, client) -> pipeline.TrainedModel:
    """Train on --train-month, save it, and record the training event when a store is open."""
    period = pd.Period(args.train_month, freq="M")
    inputs = month_inputs(args, [(period.year, period.month)])
    if not inputs:
        sys.exit(f"error: no data for {args.train_month} in {source_id(args)}")
    start = period.start_time
    trips = inputs[0].load()
    trained = pipeline.train(trips, start, start + pd.offsets.MonthBegin(1),
                             label_threshold=args.label_threshold, source=source_id(args))
    trained.save(model_dir(args))
    reference = replay.reference_columns(trips, trained, seed=args.seed)
    pd.DataFrame(reference).to_parquet(model_dir(args) / REFERENCE_FILE, index=False)
    test = trained.meta["metrics"]["test"]
    print(f"trained on {args.train_month}: test accuracy {test['accuracy']:.3f}, "
          f"F1 {test['f1']:.3f} (n={test['n']:,}); saved to {model_dir(args)}")
    record_in_store(args, client, trained, reference)
    return trained


REFERENCE_FILE = "reference.parquet"


def record_in_store(args, client, trained: pipeline.TrainedModel, reference: dict | None) -> None:
    """Register the model, its training event and its 'training' reference (all idempotent),
    so a fresh database gets them even when the saved model is reused."""
    if client is None:
        return
    replay.ensure_registered(client, trained, args.model_name)
    replay.record_training(client, trained, args.model_name, reference)
    print(f"recorded the training event and the 'training' reference of {args.model_name}")


def load_or_train(args, client, record: bool = True) -> pipeline.TrainedModel:
    """The saved model if it matches the data source and settings, else a fresh one.

    ``record=False`` skips re-recording a saved model's registration, training event and
    reference: a resumed live replay, whose store already holds them from the run that wrote
    its predictions (``live`` after ``backfill`` would otherwise record and print them twice).
    """
    directory = model_dir(args)
    if not args.retrain and pipeline.TrainedModel.exists(directory):
        trained = pipeline.TrainedModel.load(directory)
        same = (trained.meta.get("source") == source_id(args)
                and trained.label_threshold == args.label_threshold
                and trained.meta["train_window"]["start"].startswith(args.train_month))
        if same:
            path = directory / REFERENCE_FILE
            reference = pd.read_parquet(path).to_dict("list") if path.exists() else None
            if record:
                record_in_store(args, client, trained, reference)
            return trained
        print(f"model in {directory} was trained on other data or settings; training again")
    return train_model(args, client)


def feedback_policy(args) -> replay.FeedbackPolicy:
    return replay.FeedbackPolicy(
        cash=args.cash_feedback, missing=args.missing_feedback, seed=args.seed,
        delay=replay.Delay(args.delay, args.delay_median, args.delay_sigma))


# --------------------------------------------------------------------------------------------
# commands


def cmd_generate(args) -> None:
    out = args.out or synthetic_dir(args)
    months = parse_months(args.months)
    paths = generator.generate(out, months, scale=args.scale, seed=args.seed, fmt=args.format,
                               overwrite=args.force)
    for month, path in zip(months, paths, strict=True):
        print(f"{path}  ({generator.month_size(month, args.scale):,} trips)")


def cmd_train(args) -> None:
    client = open_client(args)
    try:
        train_model(args, client)
    finally:
        if client is not None:
            client.close()


def cmd_replay(args) -> None:
    start, until = replay.parse_time(args.start), replay.parse_time(args.until)
    if until <= start:
        sys.exit("error: --until must be after --start")
    client = open_client(args)
    try:
        latest = _latest(client, args.model_name)
        trained = load_or_train(args, client, record=not (args.command == "live" and latest))
        if client is not None:
            replay.ensure_registered(client, trained, args.model_name)
        wanted = months_between(start - pd.Timedelta(days=3), until)
        months = month_inputs(args, wanted)
        if not months:
            sys.exit(f"error: no data between {args.start} and {args.until} in "
                     f"{source_id(args)}")
        kwargs = dict(policy=feedback_policy(args), model_name=args.model_name,
                      batch_size=args.batch_size)
        # backfill [start, live_from), then live [live_from, until)
        live_from = {"backfill": until, "live": start}.get(args.command)
        if args.command == "run":
            live_from = min(until, max(start, replay.parse_time(args.live_from)))
            if latest is not None and pd.Timestamp(latest) >= live_from:
                live_from = start  # a restart: skip the backfill, live resumes from the store
        if live_from > start:
            resume = None if args.rewrite or latest is None else pd.Timestamp(latest)
            summary = replay.backfill(client, trained, months, start=start, until=live_from,
                                      progress=not args.no_progress, resume=resume, **kwargs)
            print(summary.format(), flush=True)
        if live_from < until:
            print(f"live: {args.speed:g} data seconds per second, until {args.until}", flush=True)
            summary = replay.live(client, trained, months, start=live_from, until=until,
                                  speed=args.speed, tick=args.tick,
                                  log=lambda line: print(line, flush=True), **kwargs)
            print(summary.format(), flush=True)
        if args.dry_run:
            print("dry run: nothing was written")
    except sources.SourceError as exc:
        sys.exit(f"error: {exc}")
    finally:
        if client is not None:
            client.close()


def _latest(client, model_name: str):
    """The model's latest stored prediction time; None for a new model or without a store."""
    if client is None:
        return None
    try:
        return client.latest_prediction_ts(model_name)
    except Exception as exc:  # an unknown model: 404 over HTTP, a BatchError locally
        if getattr(exc, "status", None) == 404:
            return None
        raise


def main(argv: list[str] | None = None, prog: str = "python -m loader") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # `python -m loader --scale 0.005 --speed 3600` (docker compose)
    args = build_parser(prog).parse_args(argv)
    try:
        {"generate": cmd_generate, "train": cmd_train, "backfill": cmd_replay,
         "live": cmd_replay, "run": cmd_replay}[args.command](args)
    except sources.SourceError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        print("loader: interrupted; a restart resumes where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
