import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FPNDET_SHARED", REPO.parent / "shared"))
COCO128 = SHARED / "data" / "coco128"
RACCOON = SHARED / "data" / "raccoon"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set FPNDET_SHARED or place ../shared beside the repo)")
    return path


@pytest.fixture
def coco128_dir() -> Path:
    return _require(COCO128)


@pytest.fixture
def raccoon_dir() -> Path:
    return _require(RACCOON)
