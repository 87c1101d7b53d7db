"""Every scheduler test runs twice: against the compiled reservation scheduler and against
the Python reference (see ``ppipe_trt.scheduler.native``).  Where the compiled one is not
built the first run skips, unless ``PPIPE_REQUIRE_NATIVE=1`` (CI) makes that a failure."""

from __future__ import annotations

import os

import pytest

from ppipe_trt.scheduler import native


@pytest.fixture(autouse=True, params=["compiled", "python"])
def scheduler_impl(request, monkeypatch):
    monkeypatch.delenv("PPIPE_NATIVE", raising=False)
    if request.param == "python":
        monkeypatch.setenv("PPIPE_NATIVE", "0")
    elif native.native_module() is None:
        why = native.native_status()["detail"]
        if os.environ.get("PPIPE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the compiled scheduler is required here but not available: {why}")
        pytest.skip(f"compiled scheduler not available: {why}")
    return request.param
