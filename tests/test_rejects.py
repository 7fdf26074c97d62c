import pytest

from pipeline.errors import CxrError
from pipeline.rejects import check_reject_fraction

REJECTS = [{"reason": f"broken {i}"} for i in range(5)]


def test_up_to_the_limit_passes_and_one_more_fails():
    check_reject_fraction(REJECTS[:1], 20, 0.05, "images", "/data")  # 1 of 20 = exactly 5%
    check_reject_fraction([], 0, 0.0, "images", "/data")
    with pytest.raises(CxrError, match=r"2 of 20 images rejected \(10.0% > 5%\): is /data the right dataset root"):
        check_reject_fraction(REJECTS[:2], 20, 0.05, "images", "/data")


def test_the_message_quotes_the_first_three_reasons():
    with pytest.raises(CxrError, match="First reasons: broken 0; broken 1; broken 2$"):
        check_reject_fraction(REJECTS, 5, 0.5, "label lines", "/data")
