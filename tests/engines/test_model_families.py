"""The CNN families users bring (tests/model_zoo.py) export, split and chain on CPU.

Each family is exported once; first its ONNX model is checked against PyTorch (so the zoo
itself is right), then it is built into blocks and the chained blocks are checked against
the full model.  Run with ``-s`` to see each family's build time, block count and error.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.model_zoo import FAMILIES, export_family, torch_reference

MAX_BATCH = 4


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    """(family name, path of its ONNX export), exported once per family."""
    name = request.param
    return name, export_family(name, tmp_path_factory.mktemp("zoo") / f"{name}.onnx")


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_export_matches_torch(exported, batch):
    import onnxruntime as ort

    name, path = exported
    spec = FAMILIES[name]
    x = np.random.default_rng(batch).standard_normal((batch,) + spec.input_shape,
                                                     dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(spec.output_names, session.run(list(spec.output_names),
                                                  {spec.input_name: x})))
    want = torch_reference(name, x)
    assert list(want) == list(spec.output_names)
    for out_name in spec.output_names:
        assert got[out_name].shape[0] == batch, (out_name, got[out_name].shape)
        np.testing.assert_allclose(got[out_name], want[out_name], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name}: output {out_name!r}")
    if spec.task == "segmentation":
        assert want["mask"].shape == (batch, spec.num_classes) + spec.input_shape[1:]


def test_chained_blocks_match_full_model(exported, tmp_path_factory):
    from ppipe_trt.engines import build_model_engines
    from ppipe_trt.engines.verify import check_chain

    name, path = exported
    start = time.perf_counter()
    built = build_model_engines(path, "cpu", store_root=tmp_path_factory.mktemp("store"),
                                num_blocks=6, max_batch=MAX_BATCH, progress=False, repeats=1,
                                warmup=0)
    build_s = time.perf_counter() - start
    check = check_chain(built, batches=(1, MAX_BATCH))
    print(f"\n{name}: built in {build_s:.1f} s, {built.num_blocks} blocks, "
          f"max relative error {check.max_rel_error:.2e}")
    assert built.num_blocks >= 2
    assert {s.name for s in built.outputs} == set(FAMILIES[name].output_names)
    assert check.max_rel_error <= 1e-5, check.per_output
