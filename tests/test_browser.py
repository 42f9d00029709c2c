"""The SLI browser page (``GET /ui``) in real headless Chromium against a live gunicorn.

Synthetic 2020 data is written over HTTP to the server; what the page plots, its headline
SLIs and its confusion matrix are read back from the page (``window.sliBrowser``, exposed
for this purpose) and compared with ``GET /api/v1/series`` for the same request and with
numpy/scikit-learn on the rows the test itself generated. Then a dropdown is changed and
the comparison is repeated.

``UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_browser.py`` also saves
``docs/browser.png``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import empty_database

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLF, REG = "churn-risk", "fare-estimate"
T_END = datetime(2020, 3, 2, 0, 0, tzinfo=UTC)  # the replayed 2020 data ends here
DAYS = 30
CLF_STEP_S = 240  # one prediction every 4 minutes: 10,800 predictions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------- the data and its oracle


@dataclass
class Truth:
    """What the test wrote for the classifier, as arrays: the oracle's input."""
    ts_ms: np.ndarray
    score: np.ndarray
    label: np.ndarray  # nan: no feedback
    region: np.ndarray


def make_data(seed: int = 5) -> tuple[list[dict], list[dict], Truth, list[dict], list[dict]]:
    """Classifier predictions and feedback whose quality falls in the south after 2020-02-20,
    and whose last day is only partly labeled (labels still arriving); a small regression model."""
    rng = np.random.default_rng(seed)
    end_s = int(T_END.timestamp())
    ts_s = np.arange(end_s - DAYS * 86400 + CLF_STEP_S, end_s + 1, CLF_STEP_S)
    n = len(ts_s)
    region = rng.choice(["north", "south", "east"], size=n, p=[0.5, 0.3, 0.2])
    plan = rng.choice(["free", "pro"], size=n)
    y = (rng.random(n) < 0.35).astype(float)
    decay = (region == "south") & (ts_s > datetime(2020, 2, 20, tzinfo=UTC).timestamp())
    signal = np.where(decay, 0.3, 1.5)
    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1.2, n) - 0.4)))
    score = np.round(score, 6)
    age_h = (end_s - ts_s) / 3600
    labeled = rng.random(n) < np.where(age_h < 24, 0.2 + 0.7 * age_h / 24, 0.9)
    label = np.where(labeled, y, np.nan)
    preds = [{"id": f"c{i}", "ts": int(t) * 1000, "score": float(s),
              "segments": {"region": str(r), "plan": str(p)}}
             for i, (t, s, r, p) in enumerate(zip(ts_s, score, region, plan, strict=True))]
    feedback = [{"id": f"c{i}", "ts": int(ts_s[i] + rng.integers(600, 86400)) * 1000,
                 "label": int(y[i])} for i in np.flatnonzero(labeled)]
    truth = Truth(ts_s * 1000, score, label, region)
    reg_ts = np.arange(end_s - DAYS * 86400 + 3600, end_s + 1, 3600)
    fare = rng.gamma(4, 4, len(reg_ts))
    reg_preds = [{"id": f"r{i}", "ts": int(t) * 1000, "score": float(np.round(f * 1.1, 4))}
                 for i, (t, f) in enumerate(zip(reg_ts, fare, strict=True))]
    reg_feedback = [{"id": f"r{i}", "ts": int(t + 1800) * 1000, "label": float(np.round(f, 4))}
                    for i, (t, f) in enumerate(zip(reg_ts, fare, strict=True))]
    return preds, feedback, truth, reg_preds, reg_feedback


def fill(base: str) -> Truth:
    """Write both models through the HTTP API, as a pipeline would."""
    preds, feedback, truth, reg_preds, reg_feedback = make_data()
    s = requests.Session()

    def post(path: str, body: dict) -> None:
        r = s.post(base + path, json=body, timeout=120)
        assert r.status_code in (200, 201), (path, r.text[:500])

    post("/api/v1/models", {"name": CLF, "task": "binary_classification", "threshold": 0.5})
    post("/api/v1/models", {"name": REG, "task": "regression"})
    for k in range(0, len(preds), 5000):
        post("/api/v1/predictions", {"model": CLF, "records": preds[k:k + 5000]})
    post("/api/v1/feedback", {"model": CLF, "records": feedback})
    post("/api/v1/predictions", {"model": REG, "records": reg_preds})
    post("/api/v1/feedback", {"model": REG, "records": reg_feedback})
    return truth


def _ms(window: str) -> int:
    return int(window[:-1]) * {"h": 3_600_000, "d": 86_400_000}[window[-1]]


def oracle(truth: Truth, metric: str, lo_ms: float, hi_ms: float, threshold: float = 0.5,
           region: str | None = None):
    """The classifier metric over predictions with time in (lo, hi], from the test's own rows;
    None where it is undefined (the API's null)."""
    from sklearn import metrics as skm

    sel = (truth.ts_ms > lo_ms) & (truth.ts_ms <= hi_ms)
    if region is not None:
        sel &= truth.region == region
    labeled = sel & ~np.isnan(truth.label)
    y, pred = truth.label[labeled], (truth.score[labeled] >= threshold).astype(float)
    if metric == "prediction_count":
        return float(sel.sum()) if sel.any() else None
    if metric == "label_coverage":
        return labeled.sum() / sel.sum() if sel.any() else None
    if not labeled.any():
        return None
    if metric == "accuracy":
        return skm.accuracy_score(y, pred)
    if metric == "f1":
        value = skm.f1_score(y, pred, zero_division=np.nan)
        return None if np.isnan(value) else value
    raise AssertionError(f"no oracle for {metric}")


def _close(got, expected) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return abs(got - expected) <= 1e-9 * max(1.0, abs(expected))


# ----------------------------------------------------------------------- the live server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(database_url):
    """Real gunicorn on a free loopback port, serving the test database filled over HTTP."""
    empty_database(database_url)
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "4",
         "--bind", f"127.0.0.1:{port}", "datasource:create_app()"],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url}, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still loading the app
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail("gunicorn did not start:\n" + log.read().decode()[-3000:])
            time.sleep(0.2)
        yield base, fill(base)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, with its own throwaway profile (never ``playwright install``)."""
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -r requirements-dev.txt)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run the browser test")
        pytest.skip(reason)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1160, "height": 1000})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ----------------------------------------------------------------------- helpers


def _state(page) -> dict:
    return page.evaluate("JSON.parse(JSON.stringify(window.sliBrowser))")


def _changed(page, action) -> dict:
    """Do ``action`` and wait until the page has rendered its answer."""
    before = page.evaluate("window.sliBrowser.renders")
    action()
    page.wait_for_function(f"window.sliBrowser.renders > {before}", timeout=30_000)
    return _state(page)


def _api_series(base: str, query: dict) -> tuple[list[dict], dict[str, list]]:
    r = requests.get(base + "/api/v1/series", params=query, timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()
    by_name: dict[str, list] = {}
    for row in rows:
        by_name.setdefault(row["series"], []).append([row["time"], row["value"]])
    return rows, by_name


def _expected_query(**changes) -> dict:
    """The series request the page should send, built here from the test's own data."""
    to_ms = int(T_END.timestamp() * 1000)  # the latest prediction, on a whole minute
    rng = changes.pop("range", "7d")
    query = {"model": CLF, "metric": "accuracy", "window": "1d", "mode": "sliding",
             **changes, "from": str(to_ms - _ms(rng)), "to": str(to_ms), "max_points": "300"}
    if query.get("group_by") == "none":
        del query["group_by"]
    return {k: v for k, v in query.items() if v is not None}


def _check_plot(page, base: str, truth: Truth | None, state: dict, query: dict) -> None:
    """The page sent ``query``, plotted exactly the API's answer to it, and the API's answer
    equals the oracle at every point; the SVG has one line per series with every point."""
    assert state["state"] == "ready", state["error"]
    assert state["query"] == query
    rows, by_name = _api_series(base, query)
    plotted = {s["name"]: s["points"] for s in state["series"]}
    assert plotted == by_name and plotted
    lines = page.eval_on_selector_all(
        "#chart path.line", "ps => ps.map(p => [p.dataset.series, p.getAttribute('d')])")
    assert sorted(name for name, _ in lines) == sorted(by_name)
    drawn, plotted_points = [], []
    for name, d in lines:
        coords = [tuple(map(float, xy.split(","))) for xy in re.split(r"[ML]", d) if xy]
        present = [(t, v) for t, v in by_name[name] if v is not None]
        assert len(coords) == len(present), name
        drawn += coords
        plotted_points += present
    # the lines are the values: pixel x and y are one affine function of time and value for
    # all series (to the 0.1 px the path is written with), y growing downwards
    for axis in (0, 1):
        px = np.array([c[axis] for c in drawn])
        data = np.array([p[axis] for p in plotted_points], dtype=float)
        if np.ptp(data) == 0:
            assert np.ptp(px) == 0
            continue
        slope, offset = np.polyfit(data, px, 1)
        assert np.max(np.abs(slope * data + offset - px)) < 0.11, axis
        assert (slope > 0) if axis == 0 else (slope < 0)
    legend = page.eval_on_selector_all("#legend li", "items => items.map(i => i.textContent)")
    assert all(text.startswith(name) for text, name in zip(legend, sorted(by_name), strict=True))
    if truth is None:
        return
    group = query.get("group_by")
    region_of = {row["series"]: row.get(group) for row in rows} if group else {}
    threshold = float(query.get("threshold", 0.5))
    times = sorted({row["time"] for row in rows})
    step = times[1] - times[0] if len(times) > 1 else None
    width = step if query["mode"] == "tumbling" else _ms(query["window"])
    checked = 0
    for name, points in by_name.items():
        for t, value in points:
            expected = oracle(truth, query["metric"], t - width, t, threshold, region_of.get(name))
            assert _close(value, expected), (name, t, value, expected)
            checked += 1
    assert checked >= 20


def _check_headline(page, truth: Truth, state: dict, window: str, threshold: float = 0.5) -> None:
    """Each tile: the metric over the window ending at the range's end, as the oracle says."""
    to_ms = int(T_END.timestamp() * 1000)
    for metric in ("accuracy", "f1", "label_coverage", "prediction_count"):
        tile = state["headline"][metric]
        assert tile["time"] == to_ms, metric
        expected = oracle(truth, metric, to_ms - _ms(window), to_ms, threshold)
        assert _close(tile["value"], expected), (metric, tile, expected)
    shown = page.eval_on_selector_all(
        "#tiles .tile", "ts => ts.map(t => [t.dataset.metric, t.querySelector('strong').textContent])")
    count = state["headline"]["prediction_count"]["value"]
    assert dict(shown)["prediction_count"] == f"{int(count):,}"
    coverage = state["headline"]["label_coverage"]["value"]
    assert dict(shown)["label_coverage"] == f"{100 * coverage:.1f} %"


def _check_confusion(page, truth: Truth, state: dict, range_ms: int, threshold: float) -> None:
    """The table equals scikit-learn's confusion matrix of the range's labeled predictions."""
    from sklearn.metrics import confusion_matrix

    to_ms = int(T_END.timestamp() * 1000)
    sel = (truth.ts_ms > to_ms - range_ms) & (truth.ts_ms <= to_ms) & ~np.isnan(truth.label)
    (tn, fp), (fn, tp) = confusion_matrix(truth.label[sel], truth.score[sel] >= threshold)
    got = {row["actual"]: [row["predicted 0"], row["predicted 1"], row["total"]]
           for row in state["confusion"]}
    assert got == {"0": [tn, fp, tn + fp], "1": [fn, tp, fn + tp],
                   "total": [tn + fn, fp + tp, int(sel.sum())]}
    cells = page.eval_on_selector_all(
        "#confusion tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    assert cells[2] == ["1", f"{fn:,}", f"{tp:,}", f"{fn + tp:,}"]


# ----------------------------------------------------------------------- tests


def test_page_routes_and_content_negotiation(server):
    """/ui and its assets are served; / stays JSON for the plugins, curl and health probes."""
    base, _ = server
    page = requests.get(base + "/ui", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "Accept" in page.headers["Vary"] and 'src="ui/static/app.js"' in page.text
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = requests.get(f"{base}/ui/static/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["Content-Type"], asset
    assert requests.get(base + "/ui/static/nope.js", timeout=10).status_code == 404
    for accept in (None, "*/*", "application/json", "application/json, text/plain, */*"):
        r = requests.get(base + "/", headers={"Accept": accept} if accept else {}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok", accept


def test_wants_html():
    from flask import Flask, request

    from datasource.browser import wants_html

    app = Flask(__name__)
    cases = {"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8": True,
             "text/html": True, "application/json;q=0.5, text/html": True,
             "*/*": False, "": False, "application/json": False,
             "application/json, text/plain, */*": False, "text/html;q=0.5, application/json": False}
    for accept, expected in cases.items():
        with app.test_request_context("/", headers={"Accept": accept} if accept else {}):
            assert wants_html(request) is expected, accept


def test_page_plots_the_api_values_and_follows_the_dropdowns(server, page):
    base, truth = server
    page.goto(base + "/ui")
    page.wait_for_function("window.sliBrowser.renders > 0", timeout=30_000)
    state = _state(page)
    query = _expected_query()
    _check_plot(page, base, truth, state, query)
    _check_headline(page, truth, state, "1d")
    _check_confusion(page, truth, state, _ms("7d"), 0.5)
    first = state["series"]

    # metric: the series changes and again equals the API and the oracle
    state = _changed(page, lambda: page.select_option("#metric", "f1"))
    assert state["series"] != first
    _check_plot(page, base, truth, state, _expected_query(metric="f1"))

    # window and mode
    state = _changed(page, lambda: page.select_option("#window", "6h"))
    _check_plot(page, base, truth, state, _expected_query(metric="f1", window="6h"))
    _check_headline(page, truth, state, "6h")
    state = _changed(page, lambda: page.select_option("#mode", "tumbling"))
    _check_plot(page, base, truth, state,
                _expected_query(metric="f1", window="6h", mode="tumbling"))

    # group by: one line per region, each equal to the oracle on that region's rows
    state = _changed(page, lambda: page.select_option("#group_by", "region"))
    query = _expected_query(metric="f1", window="6h", mode="tumbling", group_by="region")
    _check_plot(page, base, truth, state, query)
    assert len(state["series"]) == 3

    # threshold: typed, applied on change; the confusion matrix follows it
    state = _changed(page, lambda: (page.fill("#threshold", "0.3"), page.press("#threshold", "Tab")))
    _check_plot(page, base, truth, state, {**query, "threshold": "0.3"})
    _check_confusion(page, truth, state, _ms("7d"), 0.3)
    _check_headline(page, truth, state, "6h", threshold=0.3)

    # a bad threshold: the API's 400 message is shown, nothing is drawn
    state = _changed(page, lambda: (page.fill("#threshold", "2"), page.press("#threshold", "Tab")))
    assert state["state"] == "error" and "threshold" in state["error"]
    assert page.is_visible("#error") and "threshold" in page.text_content("#error")
    assert page.eval_on_selector_all("#chart path.line", "ps => ps.length") == 0
    assert not page.is_visible("#confusion") and page.eval_on_selector_all(".tile", "t => t.length") == 0


def test_regression_model_and_a_shared_link(server, page):
    """Another task gets its own metrics and no confusion matrix; a link's hash restores a view,
    also at ``/``; the chart follows the window's width."""
    from sklearn.metrics import mean_absolute_error

    base, truth = server
    page.goto(base + "/ui")
    page.wait_for_function("window.sliBrowser.renders > 0", timeout=30_000)
    state = _changed(page, lambda: page.select_option("#model", REG))
    query = _expected_query(model=REG, metric="mae")
    _check_plot(page, base, None, state, query)
    assert not page.is_visible("#confusion") and not page.is_visible("#threshold")
    _, _, _, reg_preds, reg_feedback = make_data()
    ts = np.array([p["ts"] for p in reg_preds])
    err_pred = np.array([p["score"] for p in reg_preds])
    err_true = np.array([f["label"] for f in reg_feedback])
    for t, value in state["series"][0]["points"]:
        sel = (ts > t - _ms("1d")) & (ts <= t)
        expected = mean_absolute_error(err_true[sel], err_pred[sel]) if sel.any() else None
        assert _close(value, expected), (t, value, expected)

    # a shared link, opened at / (a browser asks for HTML there; the plugins still get JSON)
    view = "#model=churn-risk&metric=accuracy&window=1d&mode=sliding&group_by=region&range=30d"
    page.goto(base + "/" + view)
    page.wait_for_function("window.sliBrowser.renders > 0", timeout=30_000)
    state = _state(page)
    _check_plot(page, base, truth, state,
                _expected_query(group_by="region", range="30d"))
    # a narrower window redraws the chart at its new width, same points
    wide = page.get_attribute("#chart svg", "width")
    page.set_viewport_size({"width": 760, "height": 1000})
    page.wait_for_function(f"document.querySelector('#chart svg').getAttribute('width') != '{wide}'",
                           timeout=10_000)
    assert _state(page)["series"] == state["series"]
    page.set_viewport_size({"width": 1160, "height": 1000})
    page.wait_for_function(f"document.querySelector('#chart svg').getAttribute('width') == '{wide}'",
                           timeout=10_000)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        page.mouse.move(820, 470)  # the hover read-out, over the south's decay
        page.screenshot(path=str(ROOT / "docs" / "browser.png"), full_page=True)
