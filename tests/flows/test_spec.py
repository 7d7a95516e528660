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
