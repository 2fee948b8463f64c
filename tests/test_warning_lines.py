"""lmsdp's own warnings print as one ``[lmsdp] ...`` line, on rank 0 only; other warnings are left alone."""
import warnings

import pytest

from lmsdp.runtime import warning_lines


class Shown:
    """What Python would print for the warnings raised (its own formatting path, filters applied)."""

    def __init__(self, records):
        self.records = records

    def getvalue(self):
        return "".join(warnings._formatwarnmsg(record) for record in self.records)


@pytest.fixture
def shown(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored afterwards
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield Shown(records)


def engine_like_warning():
    warnings.warn("lmsdp swap: the engine runs on cpu with the loopback transport", RuntimeWarning, stacklevel=2)


def test_lmsdp_warning_is_one_line_without_its_source_line(shown):
    warning_lines.install(0)
    engine_like_warning()
    assert shown.getvalue() == "[lmsdp] swap: the engine runs on cpu with the loopback transport\n"


def test_other_ranks_keep_lmsdp_notices_to_themselves_but_not_other_warnings(shown):
    warning_lines.install(1)
    engine_like_warning()
    warnings.warn("a user's own\nwarning", UserWarning)
    text = shown.getvalue()
    assert "lmsdp" not in text and "UserWarning: a user's own\nwarning" in text  # Python's own format


def test_one_line_others_and_installing_twice(shown):
    warning_lines.install(0, one_line_others=True)
    warning_lines.install(0, one_line_others=True)
    warnings.warn("two\nlines", UserWarning)
    engine_like_warning()
    lines = shown.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith(": UserWarning: two lines") and lines[1].startswith("[lmsdp] swap:")
