"""``--cluster`` parsing and lazy import of Ray (these need no Ray instance)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ppipe_trt.errors import BadInputError
from ppipe_trt.serving.ray_backend.cli import parse_cluster


def test_cluster_values_map_to_ray_addresses():
    assert parse_cluster("local") is None
    assert parse_cluster("ray").address is None
    assert parse_cluster("ray://head:10001").address == "ray://head:10001"
    assert parse_cluster("ray:auto").address == "auto"
    assert parse_cluster("ray:10.0.0.5:6379").address == "10.0.0.5:6379"


@pytest.mark.parametrize("bad", ["", "ray:", "kubernetes", "Ray"])
def test_bad_cluster_value_is_refused_with_the_expected_forms(bad):
    with pytest.raises(BadInputError, match="expected 'local', 'ray', 'ray://HOST:PORT'"):
        parse_cluster(bad)


def test_serving_and_api_import_without_ray():
    code = ("import sys; import ppipe_trt.serving.ray_backend, ppipe_trt.server.cli, "
            "ppipe_trt.serving.assembly, api.app; "
            "from ppipe_trt.serving.ray_backend import loadgen, cli; "
            "assert 'ray' not in sys.modules, 'ray imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serve_parser_takes_cluster():
    from ppipe_trt.cli import build_parser

    args = build_parser().parse_args(["serve", "--cluster", "ray://head:10001"])
    assert args.cluster == "ray://head:10001"
