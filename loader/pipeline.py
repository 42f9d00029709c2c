"""The essay's "high tip" pipeline (Variant A), one function per step.

This is the pipeline of the "Rethinking ML monitoring" essays (``loglabs/mltrace-demo``
``main.py``, ``loglabs/mext`` ``components``), kept faithful on purpose so the replayed accuracy
decays as it did there:

* ``clean``: ``fare_amount > 5`` and the drop-off inside the window ``[start, end)``;
* ``featurize``: after ``fillna(-1)``, ``pickup_weekday`` (Mon = 0), ``pickup_hour``,
  ``pickup_minute``, ``work_hours`` (Mon-Fri, 8 <= hour <= 18), ``passenger_count``,
  ``trip_distance``, ``RatecodeID``, ``congestion_surcharge`` and ``loc_code_diffs`` =
  ``|DOLocationID - PULocationID|`` (a difference of zone ids, not a distance: the essay's);
* ``label``: ``tip_amount / fare_amount > 0.1``.  Tips are recorded for card payments only, so a
  cash trip's recorded tip of 0 makes it a 0; that is the essay's semantics and the default;
* ``train``: ``RandomForestClassifier(max_depth=4, n_estimators=10, random_state=42)`` on the
  first 80% of the window by pickup time, metrics on the last 20%;
* ``score``: ``predict_proba[:, 1]``.

The depth-4 forest is close to the rule "high tip iff congestion_surcharge > 0", which is why its
accuracy falls when the lockdown moves trips out of the congestion zone and cash and zero tips
become more common.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

FEATURES = [
    "pickup_weekday",
    "pickup_hour",
    "pickup_minute",
    "work_hours",
    "passenger_count",
    "trip_distance",
    "RatecodeID",
    "congestion_surcharge",
    "loc_code_diffs",
]
LABEL_THRESHOLD = 0.1  # tip_amount / fare_amount above this is a "high tip"
DECISION_THRESHOLD = 0.5  # score >= this predicts a high tip
MIN_FARE = 5.0
TRAIN_FRACTION = 0.8
RF_PARAMS = {"max_depth": 4, "n_estimators": 10, "random_state": 42}
MODEL_FILE, META_FILE = "model.joblib", "model.json"


def clean(trips: pd.DataFrame, start, end, min_fare: float = MIN_FARE) -> pd.DataFrame:
    """Keep trips with ``fare_amount > min_fare`` whose drop-off falls in ``[start, end)``.

    As in the essay the window applies to the drop-off.  Pickups more than a day before
    ``start`` are dropped as well: the real files hold a few rows with broken clocks (2008,
    2003), which would otherwise become predictions years away from their month.
    """
    start, end = pd.Timestamp(start), pd.Timestamp(end)
    pickup, dropoff = trips["tpep_pickup_datetime"], trips["tpep_dropoff_datetime"]
    keep = ((trips["fare_amount"] > min_fare) & (dropoff >= start) & (dropoff < end)
            & (pickup >= start - pd.Timedelta(days=1)))
    return trips.loc[keep]


def featurize(trips: pd.DataFrame) -> pd.DataFrame:
    """The model's inputs, vectorised, in ``FEATURES`` order (index aligned with ``trips``)."""
    pickup = trips["tpep_pickup_datetime"]
    weekday = pickup.dt.day_of_week
    hour = pickup.dt.hour
    filled = trips[["passenger_count", "trip_distance", "RatecodeID", "congestion_surcharge",
                    "PULocationID", "DOLocationID"]].astype("float64").fillna(-1)
    return pd.DataFrame({
        "pickup_weekday": weekday.astype("float64"),
        "pickup_hour": hour.astype("float64"),
        "pickup_minute": pickup.dt.minute.astype("float64"),
        "work_hours": ((weekday <= 4) & (hour >= 8) & (hour <= 18)).astype("float64"),
        "passenger_count": filled["passenger_count"],
        "trip_distance": filled["trip_distance"],
        "RatecodeID": filled["RatecodeID"],
        "congestion_surcharge": filled["congestion_surcharge"],
        "loc_code_diffs": (filled["DOLocationID"] - filled["PULocationID"]).abs(),
    }, index=trips.index)


def label(trips: pd.DataFrame, threshold: float = LABEL_THRESHOLD) -> pd.Series:
    """1 if ``tip_amount / fare_amount > threshold`` else 0 (cash tips are recorded as 0)."""
    ratio = trips["tip_amount"].fillna(-1) / trips["fare_amount"]
    return (ratio > threshold).astype("int64").rename("label")


def score(model, features: pd.DataFrame) -> np.ndarray:
    """Probability of a high tip for each row."""
    if len(features) == 0:
        return np.zeros(0)
    return model.predict_proba(features[FEATURES].to_numpy())[:, 1]


def evaluate(y_true, scores, threshold: float = DECISION_THRESHOLD) -> dict:
    """Accuracy, F1, precision, recall and the positive rate at ``threshold``."""
    y_true = np.asarray(y_true)
    y_pred = (np.asarray(scores) >= threshold).astype(int)
    if len(y_true) == 0:
        return {"n": 0}
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "label_rate": float(y_true.mean()),
    }


@dataclass
class TrainedModel:
    """A fitted model and the metadata saved next to it (``model.json``)."""

    model: RandomForestClassifier
    meta: dict = field(default_factory=dict)

    @property
    def features(self) -> list[str]:
        return self.meta.get("features", FEATURES)

    @property
    def label_threshold(self) -> float:
        return self.meta.get("label_threshold", LABEL_THRESHOLD)

    @property
    def decision_threshold(self) -> float:
        return self.meta.get("decision_threshold", DECISION_THRESHOLD)

    def save(self, directory: Path) -> Path:
        """Write ``model.joblib`` and ``model.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.model, directory / MODEL_FILE)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> TrainedModel:
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        return cls(joblib.load(directory / MODEL_FILE), meta)

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / MODEL_FILE).exists() and (Path(directory) / META_FILE).exists()


def train(trips: pd.DataFrame, start, end, label_threshold: float = LABEL_THRESHOLD,
          random_state: int = RF_PARAMS["random_state"], source: str | None = None
          ) -> TrainedModel:
    """Clean, featurize and fit on ``[start, end)``: first 80% by pickup time, test on the rest."""
    data = clean(trips, start, end).sort_values("tpep_pickup_datetime", kind="stable")
    if len(data) < 10:
        raise ValueError(f"only {len(data)} usable trips between {start} and {end}")
    x, y = featurize(data), label(data, label_threshold)
    cut = int(len(data) * TRAIN_FRACTION)
    params = {**RF_PARAMS, "random_state": random_state}
    model = RandomForestClassifier(**params).fit(x.iloc[:cut].to_numpy(), y.iloc[:cut])
    train_scores = model.predict_proba(x.iloc[:cut].to_numpy())[:, 1]
    test_scores = model.predict_proba(x.iloc[cut:].to_numpy())[:, 1]
    meta = {
        "features": FEATURES,
        "label": f"tip_amount / fare_amount > {label_threshold}",
        "label_threshold": label_threshold,
        "decision_threshold": DECISION_THRESHOLD,
        "clean": f"fare_amount > {MIN_FARE}, drop-off in [start, end)",
        "train_window": {"start": str(pd.Timestamp(start)), "end": str(pd.Timestamp(end)),
                         "timezone": "America/New_York"},
        "split": f"first {TRAIN_FRACTION:.0%} by pickup time for training, the rest for test",
        "params": params,
        "metrics": {"train": evaluate(y.iloc[:cut], train_scores),
                    "test": evaluate(y.iloc[cut:], test_scores)},
        "feature_importances": dict(zip(FEATURES, map(float, model.feature_importances_),
                                        strict=True)),
        "sklearn_version": sklearn.__version__,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
    }
    return TrainedModel(model, meta)


def score_trips(trained: TrainedModel, trips: pd.DataFrame, start, end) -> pd.DataFrame:
    """Clean a window and return its trips with ``score``, ``label`` and the model's inputs.

    The result keeps the raw columns the replay needs (times, zones, vendor, payment) and adds
    the features under their own names, so record building needs no second pass.
    """
    data = clean(trips, start, end)
    x = featurize(data)
    out = data.drop(columns=[c for c in FEATURES if c in data.columns]).join(x)
    out["score"] = score(trained.model, x)
    out["label"] = label(data, trained.label_threshold)
    return out
