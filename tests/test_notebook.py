"""The Colab tour notebook runs top to bottom in a fresh kernel, is committed with its outputs, and
installs adamx only from a checkout or from its repository's URL, never by bare name.

The kernel is "python3": jupyter_client resolves it to the interpreter running the tests (the
venv's ipykernel, whether or not a kernelspec file is installed), so the notebook imports the
same adamx as the tests.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys
import textwrap

import ipykernel  # noqa: F401  (the kernel the notebook runs in)
import nbclient
import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "adamx_tour.ipynb"
PLACEHOLDER = "__GITHUB_OWNER__"


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def install_cell_source():
    return code_cells(nbformat.read(NOTEBOOK, as_version=4))[0].source


def repository_of_install_cell(source):
    """owner/name of the one `ADAMX_REPOSITORY = "https://github.com/owner/name"` assignment."""
    found = re.findall(r'^ADAMX_REPOSITORY = "https://github\.com/([^/"]+/[^/"@]+)(?:@[^"]*)?"$',
                       source, flags=re.MULTILINE)
    assert len(found) == 1, "the install cell must assign ADAMX_REPOSITORY exactly once"
    return found[0]


def run_install_cell(source, cwd, monkeypatch):
    """Executes the install cell as if adamx were not importable; returns the pip commands run."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "adamx" else find_spec(name, *args))
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda command, **kwargs: calls.append(command))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    exec(compile(source, "install cell", "exec"), {})
    return calls


def test_committed_notebook_shows_outputs_and_figures_without_errors():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [out for cell in code_cells(notebook) for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 10, "the committed notebook should carry its figures"


def test_colab_badge_opens_the_repository_the_install_cell_installs_from():
    intro = nbformat.read(NOTEBOOK, as_version=4).cells[0]
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/",
                        intro.source)
    assert badges == [repository_of_install_cell(install_cell_source())]


def test_install_cell_stops_with_a_message_while_the_owner_is_a_placeholder(tmp_path, monkeypatch):
    source = install_cell_source()
    assert repository_of_install_cell(source).startswith(PLACEHOLDER + "/")
    with pytest.raises(RuntimeError, match=f"ADAMX_REPOSITORY.*{PLACEHOLDER}") as error:
        run_install_cell(source, tmp_path, monkeypatch)
    assert "package index" in str(error.value)


def test_install_cell_installs_from_the_repository_url_never_by_bare_name(tmp_path, monkeypatch):
    source, count = re.subn(r'^ADAMX_REPOSITORY = ".*"$',
                            'ADAMX_REPOSITORY = "https://github.com/example-owner/adamx"',
                            install_cell_source(), flags=re.MULTILINE)
    assert count == 1
    calls = run_install_cell(source, tmp_path, monkeypatch)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                      "adamx[examples] @ git+https://github.com/example-owner/adamx"]]


def test_install_cell_uses_the_checkout_it_runs_in(monkeypatch):
    calls = run_install_cell(install_cell_source(), NOTEBOOK.parent, monkeypatch)
    assert calls == []
    assert sys.path[0] == str(NOTEBOOK.parents[1])


# A package named adamx planted where the notebook runs must never be imported: the install cell
# uses only the checkout the notebook belongs to.

IMPORT_AFTER_THE_CELL = textwrap.dedent("""
    import sys
    try:
        exec(compile(sys.stdin.read(), "install cell", "exec"), {})
    except RuntimeError as error:  # the placeholder owner: adamx is neither here nor installed
        print("stopped:", error)
    try:
        import adamx
        print("imported adamx")
    except ModuleNotFoundError:
        print("no adamx")
""")


def plant_adamx(directory, marker, project="adamx"):
    """An adamx/ package in `directory` that writes `marker` when imported, beside a pyproject.toml."""
    (directory / "adamx").mkdir(parents=True)
    (directory / "adamx" / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text({str(directory)!r})\n")
    (directory / "pyproject.toml").write_text(f'[project]\nname = "{project}"\n')


def import_after_install_cell(cwd):
    """Runs the install cell, then `import adamx`, from `cwd`, in a Python with no site-packages
    (so with no adamx installed, as on a fresh machine) and a fresh import system; its stdout."""
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", IMPORT_AFTER_THE_CELL],
                          input=install_cell_source(), cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def shared(directory):
    """`directory`, made writable by every user with the sticky bit, like /tmp."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o1777)
    return directory


@pytest.mark.parametrize("layout", ["shared_parent", "shared_parent_of_notebooks", "ancestor",
                                    "another_project", "working_directory",
                                    "writable_notebooks", "writable_pycache", "writable_module",
                                    "symlinked_subpackage"])
def test_install_cell_never_imports_a_package_planted_outside_its_checkout(tmp_path, layout):
    marker = tmp_path / "planted-adamx-was-imported"
    if layout == "working_directory":  # /tmp/adamx planted, the notebook run from /tmp itself
        plant_adamx(shared(tmp_path / "tmp"), marker)
        cwd = tmp_path / "tmp"
    elif layout == "writable_notebooks":  # a module the cell imports, planted in notebooks/
        plant_adamx(tmp_path / "checkout", tmp_path / "checkout-adamx-was-imported")
        cwd = shared(tmp_path / "checkout" / "notebooks")
        (cwd / "tomllib.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    elif layout == "writable_pycache":  # anyone could plant bytecode in adamx/__pycache__
        plant_adamx(tmp_path / "checkout", marker)
        shared(tmp_path / "checkout" / "adamx" / "__pycache__")
        cwd = tmp_path / "checkout" / "notebooks"
    elif layout == "writable_module":  # anyone could rewrite adamx/__init__.py
        plant_adamx(tmp_path / "checkout", marker)
        (tmp_path / "checkout" / "adamx" / "__init__.py").chmod(0o666)
        cwd = tmp_path / "checkout" / "notebooks"
    elif layout == "symlinked_subpackage":  # a subpackage that is a link into a shared directory
        plant_adamx(tmp_path / "checkout", marker)
        (tmp_path / "checkout" / "adamx" / "sub").symlink_to(shared(tmp_path / "tmp"))
        cwd = tmp_path / "checkout" / "notebooks"
    elif layout == "shared_parent":  # /tmp/adamx planted, the notebook run from /tmp/x
        plant_adamx(shared(tmp_path / "tmp"), marker)
        cwd = tmp_path / "tmp" / "x"
    elif layout == "shared_parent_of_notebooks":  # the same, with the notebook in /tmp/notebooks
        plant_adamx(shared(tmp_path / "tmp"), marker)
        cwd = tmp_path / "tmp" / "notebooks"
    elif layout == "ancestor":  # planted two levels above notebooks/
        plant_adamx(tmp_path, marker)
        cwd = tmp_path / "work" / "notebooks"
    else:  # notebooks/ beside a package named adamx of a project with another name
        plant_adamx(tmp_path, marker, project="not-adamx")
        cwd = tmp_path / "notebooks"
    cwd.mkdir(parents=True, exist_ok=True)
    assert import_after_install_cell(cwd).splitlines()[-1] == "no adamx"
    assert not marker.exists()
    assert not (tmp_path / "checkout-adamx-was-imported").exists()


def test_install_cell_imports_the_checkout_its_notebooks_directory_sits_in(tmp_path):
    marker = tmp_path / "checkout-adamx-was-imported"
    plant_adamx(tmp_path / "checkout", marker)
    (tmp_path / "checkout" / "notebooks").mkdir()
    assert import_after_install_cell(tmp_path / "checkout" / "notebooks").splitlines() == [
        "imported adamx"]
    assert marker.read_text() == str(tmp_path / "checkout")


def test_notebook_runs_top_to_bottom_in_a_fresh_kernel():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first failing cell
    cells = code_cells(notebook)
    assert all(cell.execution_count is not None for cell in cells)
    text = "".join(out.get("text", "") for cell in cells for out in cell.outputs)
    assert "mu matches m: True | nu matches v: True" in text
