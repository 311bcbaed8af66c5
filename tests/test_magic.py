"""%checkpoint in a real kernel: each sub-command's happy path and a bad input."""

from __future__ import annotations

import pytest
from conftest import wait_saved


@pytest.fixture
def kernel(start_kernel):
    return start_kernel(session="magic.ipynb")


def complaint(out) -> str:
    """What the user sees for a bad input: IPython shows a UsageError as one stderr line."""
    return (out.error or out.stderr).strip()


def run(kernel, code: str):
    out = kernel.execute(code)
    assert not out.error, out.error
    return out


def test_status_names_the_notebook_store_and_newest_checkpoint(kernel):
    run(kernel, "x = 1")
    wait_saved(kernel)
    text = run(kernel, "%checkpoint").stdout
    assert "Notebook:     magic.ipynb" in text
    assert "Store:" in text and "Newest:       checkpoint 1" in text and "as of In [1]" in text


def test_status_lists_what_was_not_saved_and_why(kernel):
    run(kernel, "import threading\nlock = threading.Lock()")
    run(kernel, "%checkpoint save")
    text = run(kernel, "%checkpoint status").stdout
    assert "lock (_thread.lock)" in text and "cannot pickle" in text


def test_save_commits_before_returning(kernel, start_kernel):
    run(kernel, "value = 'saved on demand'")
    out = run(kernel, "%checkpoint save")
    assert out.stdout.startswith("Saved checkpoint ")
    kernel.kill()
    assert start_kernel(session="magic.ipynb").value("value") == "'saved on demand'"


def test_save_is_as_of_the_cell_it_ran_in(kernel):
    """IPython 9.8+ counts a cell before running it, older IPython (Python 3.10's) after it."""
    run(kernel, "x = 1")
    wait_saved(kernel)
    out = run(kernel, "y = 2\n%checkpoint save\n%checkpoint")  # read before the cell's own checkpoint
    assert f"as of In [{out.execution_count}]" in out.stdout, out.stdout


def test_list_shows_generations_newest_first_with_cell_and_changes(kernel):
    run(kernel, "a = 1")
    wait_saved(kernel)  # else b = 2's checkpoint may still wait its turn, and a save supersedes it
    run(kernel, "b = 2")
    wait_saved(kernel)
    run(kernel, "%checkpoint save")
    lines = run(kernel, "%checkpoint list").stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "saved", "In"]
    assert lines[1].startswith("2 ") and "b = 2" in lines[1] and "+b" in lines[1]
    assert lines[2].startswith("1 ") and "a = 1" in lines[2] and "+a" in lines[2]


def test_undo_after_dropna_brings_back_the_rows(kernel):
    run(kernel, "import pandas as pd\ndf = pd.DataFrame({'a': [1.0, None, 3.0]})")
    run(kernel, "df = df.dropna()")
    assert run(kernel, "print(len(df))").stdout.strip() == "2"
    out = run(kernel, "%checkpoint undo")
    assert out.stdout.startswith("Undone: back to checkpoint 1")
    assert run(kernel, "print(len(df))").stdout.strip() == "3"


def test_each_undo_goes_one_further_back(kernel):
    for value in (1, 2, 3):
        run(kernel, f"x = {value}")
        wait_saved(kernel)  # cells run while a checkpoint is written are saved together
    run(kernel, "%checkpoint undo")
    assert kernel.value("x") == "2"
    run(kernel, "%checkpoint undo")
    assert kernel.value("x") == "1"


def test_undo_with_no_older_state_says_so(kernel):
    run(kernel, "x = 1")
    out = kernel.execute("%checkpoint undo")
    assert complaint(out) == "UsageError: %checkpoint undo: no older state kept (keep_generations is 5)"


def test_restore_an_older_generation_then_undo_returns_to_where_we_were(kernel):
    for value in (1, 2, 3):
        run(kernel, f"x = {value}")
    wait_saved(kernel)
    run(kernel, "%checkpoint restore 1")
    assert kernel.value("x") == "1"
    run(kernel, "%checkpoint undo")
    assert kernel.value("x") == "3"


def test_restore_removes_variables_the_generation_did_not_have(kernel):
    run(kernel, "x = 1")
    run(kernel, "y = 2")
    wait_saved(kernel)
    run(kernel, "%checkpoint restore 1")
    assert "NameError" in kernel.execute("y").error


def test_restore_of_an_unknown_id_is_one_clear_line(kernel):
    run(kernel, "x = 1")
    out = kernel.execute("%checkpoint restore 99")
    assert (
        complaint(out) == "UsageError: %checkpoint: no checkpoint 99 for this notebook; %checkpoint list shows the ids"
    )
    out = kernel.execute("%checkpoint restore latest")
    assert "is not a checkpoint id" in complaint(out)


def test_diff_defaults_to_the_last_two_generations(kernel):
    run(kernel, "a = 1\nb = 2")
    run(kernel, "del a\nb = 3\nc = 4")
    wait_saved(kernel)
    text = run(kernel, "%checkpoint diff").stdout
    assert "From checkpoint 1 to 2:" in text
    assert "added    c" in text and "removed  a" in text and "changed  b" in text


def test_diff_with_too_few_generations_says_so(kernel):
    out = kernel.execute("%checkpoint diff")
    assert "fewer than two checkpoints" in complaint(out)


def test_exclude_survives_a_restart(kernel, start_kernel):
    run(kernel, "%checkpoint exclude tmp_*")
    run(kernel, "tmp_big = 1\nkept = 2")
    wait_saved(kernel)
    kernel.shutdown()
    again = start_kernel(session="magic.ipynb")
    assert again.value("kept") == "2"
    assert "NameError" in again.execute("tmp_big").error
    assert "Excluded:     tmp_*" in again.execute("%checkpoint").stdout


def test_include_saves_an_excluded_name_again(kernel, start_kernel):
    run(kernel, "%checkpoint exclude secret")
    out = run(kernel, "%checkpoint include secret")
    assert "Saving again: secret" in out.stdout
    run(kernel, "secret = 42")
    wait_saved(kernel)
    kernel.kill()
    assert start_kernel(session="magic.ipynb").value("secret") == "42"


def test_exclude_without_names_is_a_usage_error(kernel):
    assert "needs one or more names" in complaint(kernel.execute("%checkpoint exclude"))


def test_clear_deletes_this_notebooks_checkpoints_and_says_what(kernel):
    run(kernel, "x = 1")
    run(kernel, "y = 2")
    wait_saved(kernel)
    out = run(kernel, "%checkpoint off\n%checkpoint clear")
    assert "Removed 2 checkpoints" in out.stdout
    assert "No checkpoints for this notebook yet." in run(kernel, "%checkpoint list").stdout


def test_off_pauses_saving_and_on_resumes_it(kernel, start_kernel):
    run(kernel, "%checkpoint off")
    run(kernel, "while_off = 1")
    wait_saved(kernel)
    kernel.kill()
    again = start_kernel(session="magic.ipynb")
    assert "NameError" in again.execute("while_off").error
    run(again, "%checkpoint on")
    run(again, "after_on = 1")
    wait_saved(again)
    again.kill()
    assert start_kernel(session="magic.ipynb").value("after_on") == "1"


def test_help_explains_every_sub_command(kernel):
    text = run(kernel, "%checkpoint --help").stdout
    for command in ("status", "save", "list", "restore ID", "undo", "diff", "exclude", "include", "clear", "off | on"):
        assert command in text


def test_unknown_sub_command_is_one_clear_line(kernel):
    out = kernel.execute("%checkpoint frobnicate")
    assert complaint(out) == "UsageError: %checkpoint: unknown command 'frobnicate'. Try %checkpoint --help"


def test_reset_empties_the_next_checkpoint_and_keeps_older_ones_for_undo(kernel, start_kernel):
    run(kernel, "x = 1")
    run(kernel, "%reset -f")
    wait_saved(kernel)
    assert "0 variables" in run(kernel, "%checkpoint").stdout
    run(kernel, "%checkpoint undo")
    assert kernel.value("x") == "1"


def test_execution_count_starts_again_at_1_after_a_restart(kernel, start_kernel):
    for _ in range(3):
        run(kernel, "x = 1")
    wait_saved(kernel)
    kernel.shutdown()
    again = start_kernel(session="magic.ipynb")
    assert again.execute("y = 2").execution_count == 1
