import pytest

from tools.fill_model_card import END, START, fill


def test_fill_replaces_only_the_marked_block():
    card = f"# Card\nintro\n{START}\nold table\n{END}\nafter\n"
    out = fill(card, "| new | table |\n")
    assert out == f"# Card\nintro\n{START}\n| new | table |\n{END}\nafter\n"
    assert fill(out, "again") == f"# Card\nintro\n{START}\nagain\n{END}\nafter\n"


def test_fill_requires_markers():
    with pytest.raises(SystemExit, match="no"):
        fill("# Card without markers\n", "x")
