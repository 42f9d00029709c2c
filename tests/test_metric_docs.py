"""The README's metric table is generated from the declarations: a stale one fails here."""

from pathlib import Path

from datasource import metric_docs
from datasource import metrics as registry

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_metric_table_is_current():
    text = README.read_text()
    assert metric_docs.render(text) == text, "run: python -m datasource.metric_docs README.md"


def test_every_builtin_and_sklearn_metric_is_documented():
    block = metric_docs.markdown()
    for m in registry.REGISTRY.values():
        if m.source in ("builtin", "sklearn"):
            assert f"| `{m.name}` |" in block, m.name
