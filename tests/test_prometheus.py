"""GET /metrics for Prometheus, the SLO rules, and a real Prometheus scraping a real gunicorn.

Every exported SLI is checked against scikit-learn on rows chosen in plain
Python for the window (t - W, t], t = the export time rounded up to the
minute; counters against counts of the final rows. The rules are checked by
``promtool`` and, end to end, Prometheus's HTTP API must return the oracle's
value. Without ``prometheus``/``promtool`` those tests skip, unless CI=true.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import sklearn.metrics as skm
from prometheus_client.parser import text_string_to_metric_families

from datasource import exporter, slo
from tests import oracle
from tests.conftest import ROOT, with_settings

T0_MS = 1580515200000  # 2020-02-01T00:00:00Z
SPAN_MS = 30 * 3600 * 1000
HOUR_S, DAY_S = 3600, 86400
RULES = ROOT / "provisioning" / "prometheus" / "mlsli-slo-rules.yml"
PROMTOOL_TEST = ROOT / "tests" / "prometheus" / "slo-rules.test.yml"


@pytest.fixture(autouse=True)
def _fresh_exporter():
    exporter.clear_caches()
    yield
    exporter.clear_caches()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (CI=true requires it; apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus); set CI=true to fail instead")
    return path


# ----------------------------------------------------------------------- data and oracles


def _write(http, rng, model: str, task: str, n: int = 1500, start_ms: int = T0_MS,
           span_ms: int = SPAN_MS, labeled: float = 0.75, with_ids: bool = False):
    """Predictions with late feedback, re-sent predictions and label corrections; the truth."""
    assert http.post("/api/v1/models", json={"name": model, "task": task}).status_code == 201
    preds = []
    for i in range(n):
        ts = start_ms + int(rng.integers(0, span_ms))
        score = float(rng.random()) if task == "binary_classification" else float(rng.normal(50, 10))
        preds.append({"id": f"{model}-{i}", "ts": ts, "score": score,
                      "segments": {"b": str(rng.choice(["x", "y"]))}})
    for _ in range(n // 20):  # re-sent with a new score
        p = dict(preds[int(rng.integers(0, n))])
        p["score"] = float(rng.random()) if task == "binary_classification" else p["score"] + 3.0
        preds.append(p)
    fbs = []
    for p in preds[:n]:
        if rng.random() < labeled:
            y = (int(rng.random() < 0.2 + 0.6 * p["score"]) if task == "binary_classification"
                 else float(p["score"] + rng.normal(0, 5)))
            fbs.append({"id": p["id"], "ts": p["ts"] + int(rng.integers(1, 3_600_000)), "label": y})
    for _ in range(n // 25 if fbs else 0):  # corrections, written after
        f = dict(fbs[int(rng.integers(0, len(fbs)))])
        f["label"] = 1 - f["label"] if task == "binary_classification" else f["label"] + 1.0
        fbs.append(f)
    for k in range(0, len(preds), 500):
        r = http.post("/api/v1/predictions", json={"model": model, "records": preds[k:k + 500]})
        assert r.status_code == 200, r.get_json()
    if fbs:
        r = http.post("/api/v1/feedback", json={"model": model, "records": fbs})
        assert r.status_code == 200, r.get_json()
    final_p, final_f = {p["id"]: p for p in preds}, {f["id"]: f for f in fbs}
    truth = oracle.build_truth(final_p, final_f)
    return (truth, final_p, final_f) if with_ids else truth


def _end_of(ts_ms: float) -> int:
    """The window end the README promises: the time rounded up to a whole minute (seconds)."""
    return -(-int(math.ceil(ts_ms / 1000)) // 60) * 60


def _expected(truth: oracle.Truth, metric: str, window_s: int, end_s: int, thr: float = 0.5,
              mask: np.ndarray | None = None) -> float:
    """scikit-learn on the rows with ts in (end - W, end]; NaN when undefined."""
    t = truth.ts_ms / 1000.0
    keep = (t > end_s - window_s) & (t <= end_s)
    if mask is not None:
        keep &= mask
    y, s = truth.label[keep], truth.score[keep]
    lab = ~np.isnan(y)
    if metric == "prediction_count":
        return float(keep.sum()) if keep.any() else math.nan
    if metric == "label_coverage":
        return float(lab.sum()) / float(keep.sum()) if keep.any() else math.nan
    if not lab.any():
        return math.nan
    if metric == "accuracy":
        return float(skm.accuracy_score(y[lab].astype(int), (s[lab] >= thr).astype(int)))
    if metric == "mae":
        return float(skm.mean_absolute_error(y[lab], s[lab]))
    if metric == "f1":
        return float(skm.f1_score(y[lab].astype(int), (s[lab] >= thr).astype(int)))
    raise KeyError(metric)


def _scrape(http) -> tuple[dict, str]:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.get_data(as_text=True)
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, text


def _get(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# ----------------------------------------------------------------------- the exposition


def test_exported_slis_equal_scikit_learn(app, http):
    rng = np.random.default_rng(7)
    clf = _write(http, rng, "clf", "binary_classification")
    reg = _write(http, rng, "reg", "regression")
    with_settings(app, export_window_end="latest")
    samples, _ = _scrape(http)
    checked = 0
    for name, truth, metrics in (("clf", clf, ("accuracy", "label_coverage", "prediction_count")),
                                 ("reg", reg, ("mae", "label_coverage", "prediction_count"))):
        end = _end_of(truth.ts_ms.max())
        assert _get(samples, "mlsli_sli_window_end_seconds", model=name) == end
        for window, width in (("1h", HOUR_S), ("1d", DAY_S)):
            for metric in metrics:
                want = _expected(truth, metric, width, end)
                got = _get(samples, "mlsli_sli", model=name, metric=metric, window=window)
                assert not math.isnan(want) and got is not None, (name, metric, window)
                assert oracle.close(got, want), (name, metric, window, got, want)
                checked += 1
        # regression models export no accuracy; classifiers no mae
        other = "accuracy" if name == "reg" else "mae"
        assert _get(samples, "mlsli_sli", model=name, metric=other, window="1h") is None
    assert checked == 12


def test_counters_count_final_rows_and_never_decrease(app, http):
    rng = np.random.default_rng(11)
    truth, final_p, final_f = _write(http, rng, "clf", "binary_classification", with_ids=True)
    samples, text = _scrape(http)
    lab = ~np.isnan(truth.label)
    y, pred = truth.label[lab].astype(int), (truth.score[lab] >= 0.5).astype(int)
    correct = int(skm.accuracy_score(y, pred, normalize=False))
    assert "# TYPE mlsli_correct_predictions_total counter" in text
    assert _get(samples, "mlsli_predictions_total", model="clf") == len(truth.ts_ms)
    assert _get(samples, "mlsli_labeled_predictions_total", model="clf") == lab.sum()
    assert _get(samples, "mlsli_correct_predictions_total", model="clf") == correct

    # Corrections make 10 correct predictions wrong: the stored total drops by 10, which
    # Prometheus would read as a reset; the exported counter holds its high-water mark.
    right = [oid for oid, f in final_f.items()
             if oid in final_p and int(final_p[oid]["score"] >= 0.5) == f["label"]][:10]
    flips = [{"id": oid, "ts": final_f[oid]["ts"] + 1, "label": 1 - final_f[oid]["label"]}
             for oid in right]
    assert http.post("/api/v1/feedback", json={"model": "clf", "records": flips}).status_code == 200
    exporter.SNAPSHOTS.clear()
    samples, _ = _scrape(http)
    assert _get(samples, "mlsli_correct_predictions_total", model="clf") == correct

    # 15 new correct predictions: the store holds correct + 5, and the counter follows it.
    end = T0_MS + SPAN_MS
    new = [{"id": f"new-{i}", "ts": end + 60_000 * i, "score": 0.9} for i in range(15)]
    assert http.post("/api/v1/predictions", json={"model": "clf", "records": new}).status_code == 200
    fb = [{"id": f"new-{i}", "ts": end + 60_000 * i + 1000, "label": 1} for i in range(15)]
    assert http.post("/api/v1/feedback", json={"model": "clf", "records": fb}).status_code == 200
    exporter.SNAPSHOTS.clear()
    samples, _ = _scrape(http)
    assert _get(samples, "mlsli_correct_predictions_total", model="clf") == correct + 5
    assert _get(samples, "mlsli_labeled_predictions_total", model="clf") == lab.sum() + 15
    assert _get(samples, "mlsli_predictions_total", model="clf") == len(truth.ts_ms) + 15


def test_wall_clock_window_and_undefined_values_omitted(app, http):
    """Default EXPORT_WINDOW_END=now: the windows end at the scrape; an undefined SLI is absent."""
    rng = np.random.default_rng(3)
    now_ms = int(time.time() * 1000)
    truth = _write(http, rng, "live", "binary_classification", n=400,
                   start_ms=now_ms - 20 * HOUR_S * 1000, span_ms=20 * HOUR_S * 1000 - 1)
    # a model whose last hour holds predictions only, no labels
    _write(http, rng, "nolabels", "binary_classification", n=50,
           start_ms=now_ms - HOUR_S * 1000 // 2, span_ms=60_000, labeled=0.0)
    before = time.time()
    samples, _ = _scrape(http)
    after = time.time()
    end = _get(samples, "mlsli_sli_window_end_seconds", model="live")
    assert _end_of(before * 1000) <= end <= _end_of(after * 1000) and end % 60 == 0
    for window, width in (("1h", HOUR_S), ("1d", DAY_S)):
        for metric in ("accuracy", "label_coverage", "prediction_count"):
            want = _expected(truth, metric, width, int(end))
            assert oracle.close(_get(samples, "mlsli_sli", model="live", metric=metric,
                                     window=window), want), (metric, window)
    assert _get(samples, "mlsli_sli", model="nolabels", metric="prediction_count", window="1h") == 50
    assert _get(samples, "mlsli_sli", model="nolabels", metric="label_coverage", window="1h") == 0
    assert _get(samples, "mlsli_sli", model="nolabels", metric="accuracy", window="1h") is None
    assert _get(samples, "mlsli_correct_predictions_total", model="nolabels") == 0


def test_config_adds_grouped_and_extra_slis(app, http, tmp_path):
    rng = np.random.default_rng(5)
    truth = _write(http, rng, "clf", "binary_classification")
    _write(http, rng, "reg", "regression", n=200)
    cfg = tmp_path / "export.yaml"
    cfg.write_text("include_defaults: false\nslis:\n"
                   "  - {model: '*', metric: f1, window: 6h}\n"
                   "  - {model: clf, metric: accuracy, window: 1d, group_by: b}\n")
    extra, defaults = exporter.load_config(str(cfg))
    with_settings(app, export_window_end="latest")
    saved = app.extensions["mlsli_exporter"]
    app.extensions["mlsli_exporter"] = {"extra": extra, "defaults": defaults}
    try:
        samples, _ = _scrape(http)
    finally:
        app.extensions["mlsli_exporter"] = saved
    end = _end_of(truth.ts_ms.max())
    assert oracle.close(_get(samples, "mlsli_sli", model="clf", metric="f1", window="6h"),
                        _expected(truth, "f1", 6 * HOUR_S, end))
    seg = np.array([s.get("b") for s in truth.segments])
    for group in ("x", "y"):
        got = _get(samples, "mlsli_sli", model="clf", metric="accuracy", window="1d",
                   group_by="b", group=group)
        assert oracle.close(got, _expected(truth, "accuracy", DAY_S, end, mask=seg == group))
    # no defaults; f1 does not apply to the regression model
    assert _get(samples, "mlsli_sli", model="clf", metric="accuracy", window="1h") is None
    assert not [k for k in samples if k[0] == "mlsli_sli" and ("model", "reg") in k[1]]
    # the config shipped as an example is valid
    extra, defaults = exporter.load_config(str(ROOT / "config" / "export.yaml"))
    assert extra and defaults


@pytest.mark.parametrize("text, message", [
    ("slis: [{metric: nope, window: 1h}]", "unknown metric"),
    ("slis: [{metric: accuracy, window: 5x}]", "not of the form"),
    ("slis: [{metric: confusion_matrix, window: 1h}]", "table"),
    ("slis: [{metric: accuracy, window: 1h, colour: red}]", "takes model"),
    ("slis: {metric: accuracy}", "must be a list"),
    ("other: 1", "expected keys"),
    ("slis: [", "EXPORT_CONFIG"),
])
def test_bad_export_config_fails_at_start(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(exporter.ExportConfigError, match=message):
        exporter.load_config(str(cfg))


def test_bad_window_end_setting_fails_at_start(database_url):
    from datasource import create_app

    with pytest.raises(exporter.ExportConfigError, match="EXPORT_WINDOW_END"):
        create_app({"database_url": database_url, "export_window_end": "yesterday"})


def test_get_and_post_metrics_share_the_path(app, http):
    """Prometheus GETs /metrics; simpod-json-datasource POSTs it for its metric list."""
    r = http.post("/metrics", json={})
    assert r.status_code == 200 and r.is_json
    assert "accuracy" in {m["value"] for m in r.get_json()}
    r = http.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    assert http.put("/metrics").status_code == 405


def test_server_health_counters(app, http):
    before, _ = _scrape(http)

    def value(samples, name, **labels):
        return _get(samples, name, **labels) or 0.0

    for _ in range(7):
        assert http.get("/").status_code == 200
    assert http.get("/no/such/route").status_code == 404
    assert http.post("/api/v1/models", json={"name": "m", "task": "binary_classification"}).status_code == 201
    recs = [{"id": f"p{i}", "ts": T0_MS + i * 1000, "score": 0.5} for i in range(12)]
    assert http.post("/api/v1/predictions", json={"model": "m", "records": recs}).status_code == 200
    bad = http.post("/api/v1/predictions", json={"model": "m", "records": [{"id": "x"}]})
    assert bad.status_code == 400 and "message" in bad.get_json()
    fb = [{"id": f"p{i}", "ts": T0_MS + i * 1000 + 5, "label": 1} for i in range(5)]
    assert http.post("/api/v1/feedback", json={"model": "m", "records": fb}).status_code == 200
    after, text = _scrape(http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mlsli_http_requests_total", endpoint="grafana.health", method="GET", status="200") == 7
    assert delta("mlsli_http_requests_total", endpoint="unmatched", method="GET", status="404") == 1
    assert delta("mlsli_http_requests_total", endpoint="exporter.metrics", method="GET", status="200") == 1
    assert delta("mlsli_http_request_duration_seconds_count", endpoint="grafana.health", method="GET") == 7
    assert delta("mlsli_ingest_rows_total", kind="predictions") == 12
    assert delta("mlsli_ingest_rows_total", kind="feedback") == 5
    assert delta("mlsli_ingest_batches_rejected_total", kind="predictions", status="400") == 1
    assert "# TYPE mlsli_database_errors_total counter" in text
    assert value(after, "mlsli_sli_export_ok") == 1


# ----------------------------------------------------------------------- SLO rules


def test_rules_file_is_generated_from_config():
    text = slo.render(slo.load(ROOT / "config" / "slos.yaml"))
    assert RULES.read_text() == text, ("stale: run python -m datasource.slo config/slos.yaml "
                                       "-o provisioning/prometheus/mlsli-slo-rules.yml")


def test_burn_factors():
    """The workbook's factors for 30 days, and thresholds that can fire for any budget."""
    period = 30 * DAY_S
    factors = [slo.workbook_factor(share, period, long_w) for _, long_w, _, share in slo.PAIRS]
    assert np.allclose(factors, [14.4, 6, 3, 1])
    for budget in (0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9):
        thresholds = [slo.error_threshold(f, budget) for f in factors]
        assert all(budget <= t < 1 for t in thresholds)  # an error ratio of 1 exceeds every one
        assert thresholds == sorted(thresholds, reverse=True)  # page above ticket
        assert thresholds[-1] == pytest.approx(budget)  # factor 1: exactly the objective
        # errors per good event multiplied by f: odds(threshold) = f * odds(budget)
        for f, t in zip(factors, thresholds, strict=True):
            assert t / (1 - t) == pytest.approx(f * budget / (1 - budget))
    # tiny budgets: the workbook's thresholds f * b within 1.5 %
    assert slo.error_threshold(14.4, 0.001) == pytest.approx(14.4 * 0.001, rel=0.015)
    # accuracy >= 0.7: the workbook's 14.4x and 6x pages need error ratios 4.32 and 1.8
    assert slo.error_threshold(14.4, 0.3) == pytest.approx(0.860558, abs=1e-6)


@pytest.mark.parametrize("text, message", [
    ("slos: [{model: m, sli: precision, objective: 0.9}]", "sli must be"),
    ("slos: [{model: m, sli: accuracy, objective: 1.5}]", "objective"),
    ("slos: [{model: m, sli: accuracy, objective: 0.9, period: 1d}]", "period"),
    ("slos: [{sli: accuracy, objective: 0.9}]", "model"),
    ("slos: [{model: m, sli: accuracy, objective: 0.9, extra: 1}]", "unknown keys"),
    ("slos: []", "non-empty"),
])
def test_bad_slo_config(tmp_path, text, message, capsys):
    cfg = tmp_path / "slos.yaml"
    cfg.write_text(text)
    with pytest.raises(slo.SloError, match=message):
        slo.load(cfg)
    assert slo.main([str(cfg)]) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_promtool_checks_and_tests_the_rules():
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    check = subprocess.run([promtool, "check", "config",
                            str(ROOT / "provisioning" / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(PROMTOOL_TEST)], capture_output=True,
                          text=True, cwd=ROOT)
    assert unit.returncode == 0, unit.stdout + unit.stderr


# ----------------------------------------------------------------------- real gunicorn + Prometheus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def _wait(what: str, check, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            got = check()
            if got:
                return got
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen within {timeout_s}s; log:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _gunicorn(database_url: str, tmp: Path):
    """``gunicorn -w 2 -c datasource/gunicorn_conf.py`` on 127.0.0.1, multiprocess metrics."""
    port, log = _free_port(), tmp / "gunicorn.log"
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp / "multiproc"), "EXPORT_WINDOW_END": "latest"}
    env.pop("INGEST_TOKEN", None)
    env.pop("EXPORT_CONFIG", None)
    (tmp / "multiproc").mkdir()
    (tmp / "multiproc" / "counter_1.db").write_bytes(b"stale")  # a previous run's: wiped at start
    cmd = [sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "2", "-c",
           "datasource/gunicorn_conf.py", "-b", f"127.0.0.1:{port}", "datasource:create_app()"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        _stop(proc)


@contextlib.contextmanager
def _prometheus(binary: str, target: str, tmp: Path):
    port, log = _free_port(), tmp / "prometheus.log"
    config = tmp / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: mlsli\n    scrape_interval: 1s\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        _stop(proc)


def _instant(prom: str, expr: str) -> list:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_real_prometheus_scrapes_real_gunicorn(http, database_url, tmp_path):
    binary = _binary("prometheus")
    rng = np.random.default_rng(21)
    truth = _write(http, rng, "clf", "binary_classification")
    end = _end_of(truth.ts_ms.max())
    lab = ~np.isnan(truth.label)
    correct = skm.accuracy_score(truth.label[lab].astype(int),
                                 (truth.score[lab] >= 0.5).astype(int), normalize=False)
    with _gunicorn(database_url, tmp_path) as (proc, url, glog):
        health_requests = 0

        def ready():
            nonlocal health_requests
            assert proc.poll() is None, glog.read_text()[-3000:]
            status = requests.get(url + "/", timeout=2).status_code
            health_requests += 1
            return status == 200

        _wait("gunicorn start", ready, 90, glog)
        assert not (tmp_path / "multiproc" / "counter_1.db").exists()
        target = url.removeprefix("http://")
        with _prometheus(binary, target, tmp_path) as (pproc, prom, plog):
            _wait("a scrape", lambda: _instant(prom, 'mlsli_sli{model="clf"}'), 60, plog)
            for window, width in (("1h", HOUR_S), ("1d", DAY_S)):
                for metric in ("accuracy", "label_coverage", "prediction_count"):
                    result = _instant(prom, f'mlsli_sli{{model="clf",metric="{metric}",'
                                            f'window="{window}"}}')
                    assert len(result) == 1, result
                    assert result[0]["metric"]["job"] == "mlsli"
                    got = float(result[0]["value"][1])
                    assert oracle.close(got, _expected(truth, metric, width, end)), (metric, window)
            got = _instant(prom, 'mlsli_correct_predictions_total{model="clf"}')
            assert float(got[0]["value"][1]) == correct
            got = _instant(prom, 'mlsli_labeled_predictions_total{model="clf"}')
            assert float(got[0]["value"][1]) == lab.sum()

            # N requests on fresh connections reach both workers; a scrape (by either worker)
            # sums every worker's file, so Prometheus sees exactly N more than before.
            expr = 'sum(mlsli_http_requests_total{endpoint="grafana.health",method="GET"})'

            def settled():  # two scrapes apart agree: no request still in flight
                first = float(_instant(prom, expr)[0]["value"][1])
                time.sleep(2.5)
                return first == float(_instant(prom, expr)[0]["value"][1]) and [first]

            base = _wait("a settled request count", settled, 30, plog)[0]
            assert base >= health_requests  # the start-up probes (timed-out ones count too)
            n = 30
            for _ in range(n):
                assert requests.get(url + "/", timeout=5).status_code == 200

            def counted():
                result = _instant(prom, expr)
                return result and float(result[0]["value"][1]) >= base + n and result

            result = _wait("the requests in a scrape", counted, 30, plog)
            assert float(result[0]["value"][1]) == base + n
            files = {p.name for p in (tmp_path / "multiproc").glob("counter_*.db")}
            assert len(files) >= 2, files  # one per worker: the sum spans processes
            up = _instant(prom, 'up{job="mlsli"}')
            assert up and up[0]["value"][1] == "1"
            assert pproc.poll() is None


def test_database_errors_are_counted(http, database_url):
    """A statement timeout answers 503 JSON, and the scrape counts it as a database error."""
    from datasource import create_app

    rng = np.random.default_rng(2)
    _write(http, rng, "clf", "binary_classification", n=3000)
    slow = create_app({"database_url": database_url, "statement_timeout_ms": 1, "pool_size": 1})
    client = slow.test_client()
    try:
        _timeouts_counted(client)
    finally:
        slow.extensions["pool"].close()


def _timeouts_counted(client) -> None:
    before, _ = _scrape(client)
    body = {"range": {"from": "2020-02-01T00:00:00Z", "to": "2020-02-03T00:00:00Z"},
            "intervalMs": 1000, "maxDataPoints": 100000,
            "targets": [{"target": "accuracy", "refId": "A",
                         "payload": {"model": "clf", "window": "7m", "threshold": "0.37"}}]}
    statuses = {client.post("/query", json=body).status_code for _ in range(3)}
    assert statuses == {503}
    after, _ = _scrape(client)
    key = ("mlsli_database_errors_total", (("kind", "timeout"),))
    assert after.get(key, 0) - before.get(key, 0) >= 1
