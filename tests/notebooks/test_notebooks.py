"""The notebooks run top to bottom against a real registry written by the whole DAG."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_registry_review_notebook_executes(lifecycle_run, monkeypatch):
    workdir, summary = lifecycle_run
    monkeypatch.setenv("CANARYFLOW_WORKDIR", str(workdir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(REPO / "notebooks" / "01-registry-review.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert f"'champion': '{summary['registry']['aliases']['champion']}'" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot rendered
    assert "passed" in text
    assert "from_version" in text and "to_version" in text  # the ledger table
