import logging

import pytest

from paddler.balancer.server import warn_about_exposure
from paddler.config import BalancerSettings
from paddler.config.model import EXAMPLE_TOKEN


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        (BalancerSettings(management_host="0.0.0.0"), "WITHOUT A TOKEN"),
        (BalancerSettings(management_token=EXAMPLE_TOKEN), "still the example's placeholder"),
        (BalancerSettings(), None),
        (BalancerSettings(management_host="0.0.0.0", management_token="x" * 32), None),
    ],
)
def test_exposed_management_api_is_announced_loudly(
    caplog: pytest.LogCaptureFixture, settings: BalancerSettings, warning: str | None
) -> None:
    with caplog.at_level(logging.WARNING, logger="paddler.balancer"):
        warn_about_exposure(settings)
    if warning is None:
        assert caplog.records == []
    else:
        (record,) = caplog.records
        assert warning in record.getMessage()
