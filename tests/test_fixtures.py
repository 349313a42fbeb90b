"""The reference fixtures live in the repository, and a missing one fails in CI instead of
skipping (a skipped parity test would look like a green suite)."""

import pytest

import helpers


def test_reference_fixtures_are_in_the_repository():
    assert helpers.FIXTURES.is_relative_to(helpers.REPO)
    for name in [
        "README.md",
        "make_upstream_checkpoint.py",
        "expected_r50.pt",
        "manifest_r50_panoptic.json",
    ]:
        assert (helpers.FIXTURES / name).is_file(), name


@pytest.mark.parametrize(
    "ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_fixture_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setattr(helpers, "FIXTURES", tmp_path)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="reference fixture .*expected_r50.pt not available"):
        helpers.load_reference("r50")
