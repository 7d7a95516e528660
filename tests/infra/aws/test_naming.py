"""S3 bucket names and AWS regions are checked offline, by S3's published rules and botocore's
own region data, in one place (the spec and the event fabric both use it)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from event_bridge.fabric import BucketSpec
from infra.aws.naming import bucket_name_problem, check_bucket_name, known_regions, region_problem


@pytest.mark.parametrize("name", [
    "abc", "a" * 63, "my-bucket.2026", "results-7", "1st-bucket", "xn-single-dash",
    "ends-with-s3alias-not", "a.b.c", "192.168.5.4x", "999.168.5.4"])
def test_names_s3_accepts(name):
    assert bucket_name_problem(name) is None
    assert check_bucket_name(name) == name


@pytest.mark.parametrize(("name", "rule"), [
    ("ab", "3 to 63 characters"),
    ("a" * 64, "3 to 63 characters"),
    ("My-Bucket", "lower-case"),
    ("under_score", "lower-case"),
    ("-starts-with-dash", "begin and end"),
    ("ends-with-dot.", "begin and end"),
    ("two..dots", "two adjacent periods"),
    ("192.168.5.4", "IP address"),
    ("10.0.0.1", "IP address"),
    ("xn--punycode", "prefix 'xn--'"),
    ("sthree-bucket", "prefix 'sthree-'"),
    ("sthree-configurator", "prefix 'sthree-'"),
    ("amzn-s3-demo-bucket", "prefix 'amzn-s3-demo-'"),
    ("my-ap-s3alias", "suffix '-s3alias'"),
    ("my-olap--ol-s3", "suffix '--ol-s3'"),
    ("my-mrap.mrap", "suffix '.mrap'"),
    ("my-dir--x-s3", "suffix '--x-s3'"),
    ("my-tables--table-s3", "suffix '--table-s3'"),
])
def test_names_s3_refuses_name_the_rule(name, rule):
    problem = bucket_name_problem(name)
    assert problem is not None and rule in problem
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        check_bucket_name(name)


def test_event_fabric_uses_the_same_rules():
    assert BucketSpec(name="fabric-bucket").name == "fabric-bucket"
    with pytest.raises(ValidationError, match="reserved suffix '--x-s3'"):
        BucketSpec(name="fabric--x-s3")


def test_regions_come_from_botocore_data():
    regions = known_regions()
    # every partition's regions, not only the commercial one
    assert {"us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"} <= regions
    assert all(region_problem(r) is None for r in sorted(regions))


def test_a_well_formed_unlisted_region_needs_the_explicit_opt_in():
    problem = region_problem("us-east-9")
    assert problem is not None and "allow_unlisted_region" in problem
    assert region_problem("us-east-9", allow_unlisted=True) is None


@pytest.mark.parametrize("region", ["useast1", "US-EAST-1", "us-east-1a", "moon-base-1", "",
                                    "us_east_1", "us-east-1 "])
def test_malformed_regions_are_refused_even_with_the_opt_in(region):
    problem = region_problem(region, allow_unlisted=True)
    assert problem is not None and "not an AWS region name" in problem


def test_a_typo_gets_a_suggestion():
    assert "did you mean 'eu-west-1'" in region_problem("eu-wset-1")
