import json
import shutil

import pytest

from ppipe_trt.errors import ProfileFormatError
from ppipe_trt.profiles import (BlockLatencyTable, ModelProfile, load_profiles, read_profile,
                                write_profile)


def test_loads_all_28_shared_models(shared_profiles):
    assert len(shared_profiles) == 28
    m = shared_profiles["colorization-v2"]
    assert m.num_blocks == 10 and len(m.cut_bytes_per_sample) == 9
    assert m.gpu_classes == ("L4", "P4", "T4", "V100")
    assert m.mps_shares("P4") == (1,)
    assert m.mps_shares("T4") == (1, 2, 3, 4)
    # MPS tables are profiled on fewer batch sizes
    assert (m.max_batch("T4", 1), m.max_batch("T4", 2), m.max_batch("T4", 4)) == (8, 4, 2)
    # the SLO anchor: full-model L4 batch-1 latency from full_model_latency_us.csv
    assert m.batch1_latency_us("L4") == pytest.approx(14350.5)


def test_range_latency_is_the_sum_of_block_rows(profiles_dir, shared_profiles):
    m = shared_profiles["repvgg-b3"]
    rows = [list(map(float, line.split(","))) for line in
            (profiles_dir / "block-timing-tf32" / "repvgg-b3-T4-1.csv").read_text().split()]
    assert m.range_latency_us("T4", 1, 2, 5, 3) == pytest.approx(sum(r[2] for r in rows[2:6]))
    with pytest.raises(ProfileFormatError, match="batch 5 outside 1..4"):
        m.range_latency_us("T4", 2, 0, 1, 5)
    with pytest.raises(ProfileFormatError, match="no profile of repvgg-b3 on A100"):
        m.table("A100")


def test_unknown_model_names_what_exists(shared_profiles):
    with pytest.raises(ProfileFormatError, match="no profile for model 'resnet9000'"):
        shared_profiles["resnet9000"]


def _copy_subset(src, dst, model):
    (dst / "block-timing-tf32").mkdir(parents=True)
    for f in (src / "block-timing-tf32").glob(f"{model}-*.csv"):
        shutil.copy(f, dst / "block-timing-tf32" / f.name)
    shutil.copytree(src / "prepartition_mappings" / model, dst / "prepartition_mappings" / model)
    return dst / "block-timing-tf32" / f"{model}-T4-1.csv"


def test_ragged_table_is_rejected(tmp_path, profiles_dir):
    path = _copy_subset(profiles_dir, tmp_path, "repvgg-b3")
    lines = path.read_text().split()
    lines[3] = ",".join(lines[3].split(",")[:-1])
    path.write_text("\n".join(lines))
    with pytest.raises(ProfileFormatError, match="ragged latency table"):
        load_profiles(tmp_path)


def test_non_monotonic_and_non_positive_latencies_are_rejected(tmp_path, profiles_dir):
    path = _copy_subset(profiles_dir, tmp_path, "repvgg-b3")
    original = path.read_text().split()
    row = original[0].split(",")
    row[2] = "1"
    path.write_text("\n".join([",".join(row)] + original[1:]))
    with pytest.raises(ProfileFormatError, match="block 0 latency decreases from batch 2"):
        load_profiles(tmp_path)
    row = original[0].split(",")
    row[0] = "0"
    path.write_text("\n".join([",".join(row)] + original[1:]))
    with pytest.raises(ProfileFormatError, match=r"block 0 batch 1 latency 0.0 us; expected > 0"):
        load_profiles(tmp_path)


def test_missing_cut_sizes_are_reported(tmp_path, profiles_dir):
    _copy_subset(profiles_dir, tmp_path, "repvgg-b3")
    shutil.rmtree(tmp_path / "prepartition_mappings")
    with pytest.raises(ProfileFormatError, match="contraction_trans-size"):
        load_profiles(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileFormatError, match="does not exist"):
        load_profiles(tmp_path / "nope")
    with pytest.raises(ProfileFormatError, match="no profile.json found"):
        load_profiles(tmp_path)


def _profile(model, gpu, cuts=(100, 200)):
    rows = ((10.0, 18.0), (20.0, 30.0), (5.0, 9.0))
    return ModelProfile(model, 3, cuts, {(gpu, 1): BlockLatencyTable(model, gpu, 1, rows)},
                        {gpu: 34.0}, input_bytes_per_sample=12, output_bytes_per_sample=4)


def test_store_format_round_trip_and_merge(tmp_path):
    write_profile(tmp_path / "cpu" / "m" / "profile.json", _profile("m", "cpu"), {"backend": "ort"})
    write_profile(tmp_path / "T4" / "m" / "profile.json", _profile("m", "T4"))
    profile, meta = read_profile(tmp_path / "cpu" / "m" / "profile.json")
    assert meta == {"backend": "ort"}
    assert profile == _profile("m", "cpu")
    merged = load_profiles(tmp_path)["m"]
    assert merged.gpu_classes == ("T4", "cpu")
    assert merged.range_latency_us("T4", 1, 0, 2, 2) == pytest.approx(57.0)
    assert merged.bytes_into_block(0) == 12 and merged.bytes_out_of_block(2) == 4


def test_store_profiles_that_disagree_on_blocks_do_not_merge(tmp_path):
    write_profile(tmp_path / "cpu" / "m" / "profile.json", _profile("m", "cpu"))
    write_profile(tmp_path / "T4" / "m" / "profile.json", _profile("m", "T4", cuts=(100, 300)))
    with pytest.raises(ProfileFormatError, match="profiles disagree on the blocks"):
        load_profiles(tmp_path)


def test_store_format_rejects_other_versions_and_garbage(tmp_path):
    path = write_profile(tmp_path / "p" / "profile.json", _profile("m", "cpu"))
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileFormatError, match="version 99"):
        read_profile(path)
    path.write_text("{not json")
    with pytest.raises(ProfileFormatError, match="invalid JSON"):
        read_profile(path)
