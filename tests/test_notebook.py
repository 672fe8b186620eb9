"""notebooks/quickstart.ipynb: a valid notebook stored without outputs; (slow) executed end to end on
CPU against an empty workdir, so its in-notebook short training, the report and the zone map run."""

import ast
import pathlib

import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_is_valid_clean_and_parses():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in nb.cells if cell.cell_type == "code"), "store the notebook without outputs"
    for source in _code(nb):
        ast.parse(source)
    joined = "\n".join(_code(nb))
    assert 'os.environ.get("KERVLJEPA_WORKDIR", "/tmp/kervljepa")' in joined
    assert "very short" in "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")


@pytest.mark.slow
def test_notebook_executes_on_an_empty_workdir(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("KERVLJEPA_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("XLA_FLAGS", "")                 # the kernel inherits the env: one CPU device, as a user
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (with the cell and traceback) if any cell errors.
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "training a very short one" in text and "trained phases now [1, 3]" in text
    assert "ground-truth findings:" in text and "generated report:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    assert (tmp_path / "workdir" / "eval" / "quickstart_zone_map.png").is_file()
