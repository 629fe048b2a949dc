"""Fixtures the unit tests share."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from paddler.slots import SlotTable


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SlotTable]:
    """A new slot table of 8 rows and 4 owners, closed after the test."""
    created = SlotTable.create(tmp_path / "slots.table", max_upstreams=8, max_owners=4)
    yield created
    created.close()
