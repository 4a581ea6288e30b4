"""The notebooks run top to bottom against a real registry written by the whole DAG."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _execute(name: str, workdir, monkeypatch, where=None) -> tuple[list, str]:
    """Run a notebook top to bottom against the workdir's registry; its outputs, and their text, error-free.
    With `where`, as opened the usual way: its kernel in `where`, and no variable naming the workdir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if where is None:
        monkeypatch.setenv("CANARYFLOW_WORKDIR", str(workdir))
    else:
        monkeypatch.delenv("CANARYFLOW_WORKDIR", raising=False)
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    path = str(where or REPO)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": path}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs, "\n".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)


def test_registry_review_notebook_executes(lifecycle_run, monkeypatch, tmp_path):
    workdir, summary = lifecycle_run
    # A checkout whose `make run` wrote .canaryflow, and a kernel started in its notebooks/ folder.
    (tmp_path / "notebooks").mkdir()
    (tmp_path / ".canaryflow").symlink_to(workdir)
    outputs, text = _execute("01-registry-review.ipynb", workdir, monkeypatch, where=tmp_path / "notebooks")
    assert f"'champion': '{summary['registry']['aliases']['champion']}'" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot rendered
    assert "passed" in text
    assert "from_version" in text and "to_version" in text  # the ledger table


def test_run_comparison_notebook_executes(lifecycle_run, monkeypatch):
    workdir, summary = lifecycle_run
    outputs, text = _execute("02-run-comparison.ipynb", workdir, monkeypatch)
    assert summary["run_key"][:12] in text  # the run the fixture made is in the table
    assert "challenger.bleu" in text and "champion.bleu" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
