"""NIAH heatmap tick labels: ``--protocol lacache`` labels its rows as the LaCache repository's
``niah/pred.py`` @ 0f27c33 does; ``--protocol clean`` keeps ``0, 10, ...``.

The official sweep writes ``round(depth_ratio * 100, -1)`` to its CSV with pandas, reads the CSV back
with ``pd.read_csv`` and labels the rows with ``ax.set_yticklabels(data['Document Depth'].unique())``:
float64 values, printed ``0.0, 10.0, ...``. Its columns are ``f"{int(round(cl / 1024))}k"`` (LaCache
sweep) or ``/ 1000`` (full-cache sweep) of the context lengths rounded to thousands.
"""
import io

import pytest

from lacache_core.versions import HAS_CACHE_CLASSES
from references import reference_sweep
from runs import run_niah_official as run

pytestmark = pytest.mark.skipif(not HAS_CACHE_CLASSES, reason="prompt harnesses need transformers >= 4.36")


def official_row_labels(max_tokens: int, interval: int):
    """The official heatmap's row labels, through its own CSV round trip."""
    pd = pytest.importorskip("pandas")
    depths = [depth for _, _, _, depth, seed in reference_sweep(max_tokens, interval, 1)]
    buf = io.StringIO()
    pd.DataFrame({"Document Depth": depths}).to_csv(buf, index=False)
    return [str(d) for d in pd.read_csv(io.StringIO(buf.getvalue()))["Document Depth"].unique()]


def official_column_labels(cell_tokens, method: str):
    """The official heatmap's column labels from each cell's mean prompt tokens (its two plotting functions:
    lengths rounded to thousands, ``unique()``, then ``k`` of 1024 for the LaCache sweep, of 1000 otherwise)."""
    k = 1024 if method == "lacache" else 1000
    lengths = list(dict.fromkeys(round(t / 1000) * 1000 for t in cell_tokens))
    return [f"{int(round(n / k))}k" for n in lengths]


@pytest.fixture
def drawn(monkeypatch):
    """The tick labels of every figure the harness saves: ``[(x labels, y labels)]``."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(fig, *args, **kwargs):
        save(fig, *args, **kwargs)
        ax = fig.axes[0]
        figures.append(([t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]))

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


@pytest.mark.parametrize("method", ["full", "lacache"])
def test_lacache_protocol_labels_rows_and_columns_as_the_official_script(char_model_dir, tmp_path, monkeypatch,
                                                                         drawn, method):
    extra = ["--span", "2"] if method == "lacache" else []
    rc, calls = run(char_model_dir, tmp_path, monkeypatch, "--method", method, *extra)
    assert rc == 0 and len(drawn) == 1
    columns, rows = drawn[0]
    assert rows == official_row_labels(1024, 300) == [f"{10.0 * i}" for i in range(11)]
    cell_tokens = [(len(calls[i][0]) + len(calls[i + 1][0])) // 2 for i in range(0, len(calls), 2)]  # 2 tests a cell
    assert columns == official_column_labels(cell_tokens, method) and len(columns) == 3


def test_clean_protocol_keeps_integer_depth_labels(tmp_path, drawn):
    from niah.plot import heatmap

    rows = [{"context_length": n, "depth": d, "score": 100} for n in (512, 1024) for d in ("0", "50", "100")]
    assert heatmap(rows, tmp_path / "h.png", "t") is not None
    assert drawn == [(["512", "1K"], ["0", "50", "100"])]


def test_row_label_is_the_float_as_pandas_reads_it_back():
    from niah.official import grid, row_label

    assert [row_label(c.depth) for c in grid(1024, 300)[:11]] == official_row_labels(300, 300)
