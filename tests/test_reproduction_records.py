"""The long reproduction's tables regenerate from its run records committed under docs/, without
the runs: the report of docs/reproduction.md is one command away for every reader."""

import shutil

from scripts import reproduction_report
from tests.conftest import REPO

RECORDS = REPO / "docs" / "records" / "repro_long"


def test_the_doc_regenerates_from_the_committed_records(tmp_path):
    doc = tmp_path / "reproduction.md"
    shutil.copy(REPO / "docs" / "reproduction.md", doc)
    figures = tmp_path / "figures" / "repro_long"
    reproduction_report.main(["report", str(RECORDS), "--doc", str(doc), "--out", str(figures)])
    assert doc.read_text() == (REPO / "docs" / "reproduction.md").read_text()
    for name in ("val_loss.png", "effects.png"):
        assert (figures / name).stat().st_size > 0
        assert (REPO / "docs" / "figures" / "repro_long" / name).is_file()
