from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.spec import DEFAULT_SPEC, SpecError, load_spec


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _default() -> dict:
    return yaml.safe_load(DEFAULT_SPEC.read_text())


def test_bundled_spec_is_valid():
    spec = load_spec(DEFAULT_SPEC)
    assert spec.backend == "local" and spec.aws == "embedded"
    assert spec.ranks >= 2
    assert spec.fanout.queues == ["postprocess", "audit"]


def test_overrides_win_and_none_is_ignored():
    spec = load_spec(DEFAULT_SPEC, ranks=3, aws=None)
    assert spec.ranks == 3 and spec.aws == "embedded"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "blue"}, "colour"),
        ({"ranks": 0}, "ranks"),
        ({"backend": "kubernetes"}, "backend"),
        ({"aws": "maybe"}, "aws"),
        ({"kernel": {"name": "heat", "parameters": {"nx": -4}}}, "kernel.parameters.nx"),
        ({"kernel": {"name": "heat", "parameters": {"alpha": 0.3}}}, "kernel.parameters.alpha"),
        ({"kernel": {"name": "heat", "parameters": {"nxx": 4}}}, "kernel.parameters.nxx"),
        ({"storage": {"input_bucket": "Bad_Bucket", "results_bucket": "ok-bucket"}},
         "storage.input_bucket"),
        ({"fanout": {"queues": ["a b"]}}, "fanout.queues"),
        ({"fanout": {"queues": []}}, "fanout.queues"),
        # Strict numbers: a boolean (or a float, or a string) is not an integer.
        ({"ranks": True}, "ranks"),
        ({"ranks": 2.0}, "ranks"),
        ({"ranks": "2"}, "ranks"),
        ({"kernel": {"name": "heat", "parameters": {"steps": True}}}, "kernel.parameters.steps"),
        ({"kernel": {"name": "heat", "parameters": {"alpha": True}}}, "kernel.parameters.alpha"),
        ({"kernel": {"name": "kmer", "parameters": {"k": False}}}, "kernel.parameters.k"),
        ({"kernel": {"name": "kmer", "parameters": {"gzip": 1}}}, "kernel.parameters.gzip"),
        ({"kernel": {"name": "var", "parameters": {"paths": 1e6}}}, "kernel.parameters.paths"),
        ({"kernel": {"name": "heat", "retries": True}}, "kernel.retries"),
        ({"fanout": {"max_receive_count": True}}, "fanout.max_receive_count"),
        ({"local": {"oversubscribe": "lots"}}, "local.oversubscribe"),
        # S3's own naming rules, and regions botocore knows.
        ({"storage": {"input_bucket": "192.168.5.4", "results_bucket": "ok-bucket"}},
         "storage.input_bucket"),
        ({"storage": {"input_bucket": "ok-bucket", "results_bucket": "xn--results"}},
         "storage.results_bucket"),
        ({"storage": {"input_bucket": "ok-bucket", "results_bucket": "results--x-s3"}},
         "storage.results_bucket"),
        ({"region": "us-east-9"}, "region"),
        ({"region": "useast1"}, "region"),
        ({"region": "useast1", "allow_unlisted_region": True}, "region"),
        # Run directories never go into a system directory.
        ({"scratch_dir": "/"}, "scratch_dir"),
        ({"scratch_dir": "/usr"}, "scratch_dir"),
        ({"scratch_dir": "/etc/clusterflow"}, "scratch_dir"),
        ({"scratch_dir": "~"}, "scratch_dir"),
    ],
)
def test_bad_values_name_the_field(tmp_path, change, field):
    doc = _default()
    doc.update(change)
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, doc))
    assert f"  {field}:" in str(e.value)


def test_more_ranks_than_cells_is_refused(tmp_path):
    doc = _default()
    doc["kernel"]["parameters"] = {"nx": 2, "ny": 2}
    doc["ranks"] = 5
    with pytest.raises(SpecError, match="exceeds the 2x2 grid"):
        load_spec(_write(tmp_path, doc))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yaml")


def test_prefix_is_normalised_and_traversal_refused(tmp_path):
    doc = _default()
    doc["storage"]["results_prefix"] = "out"
    assert load_spec(_write(tmp_path, doc)).storage.results_prefix == "out/"
    doc["storage"]["results_prefix"] = "../escape/"
    with pytest.raises(SpecError, match="storage.results_prefix"):
        load_spec(_write(tmp_path, doc))


def test_yaml_numbers_are_still_numbers(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(DEFAULT_SPEC.read_text().replace("ranks: 2", "ranks: 3"))  # YAML text
    spec = load_spec(p)
    assert spec.ranks == 3 and isinstance(spec.ranks, int)
    doc = _default()
    doc["kernel"] = {"name": "heat", "parameters": {"nx": 64, "ny": 32, "steps": 5, "alpha": 0.1}}
    spec = load_spec(_write(tmp_path, doc))
    assert (spec.kernel.parameters.nx, spec.kernel.parameters.alpha) == (64, 0.1)
    doc["kernel"]["parameters"]["alpha"] = 0  # an int where a float goes is fine (then > 0)
    with pytest.raises(SpecError, match="greater than 0"):
        load_spec(_write(tmp_path, doc))


def test_an_unlisted_region_with_the_opt_in_is_accepted(tmp_path):
    doc = _default()
    doc.update(region="us-east-9", allow_unlisted_region=True)
    assert load_spec(_write(tmp_path, doc)).region == "us-east-9"


def test_oversubscription_beyond_the_default_is_refused_unless_allowed(tmp_path):
    from flows.resource_checks import usable_cores

    doc = _default()
    doc["ranks"] = 2 * usable_cores() + 1
    with pytest.raises(SpecError, match=r"ranks: \d+ ranks on the local backend"):
        load_spec(_write(tmp_path, doc))
    doc["local"] = {"oversubscribe": True}
    assert load_spec(_write(tmp_path, doc)).ranks == doc["ranks"]
    doc["backend"] = "slurm"  # Slurm decides what fits on its nodes
    doc.pop("local")
    assert load_spec(_write(tmp_path, doc)).backend == "slurm"


def test_a_grid_that_cannot_fit_is_refused_before_anything_exists(tmp_path):
    doc = _default()
    doc["kernel"]["parameters"] = {"nx": 65536, "ny": 65536, "steps": 1, "nz": 65536,
                                   "alpha": 0.1}
    with pytest.raises(SpecError, match=r"kernel.parameters: heat on 2 ranks needs about "
                       r"[\d.]+ PiB of memory \(nx=65536, ny=65536, nz=65536\)"):
        load_spec(_write(tmp_path, doc))
