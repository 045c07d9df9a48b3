import pytest

from sc_steer import ScSteerError, Site, parse_sites


def test_parse_expands_and_orders_in_forward_order():
    sites = parse_sites("resid_post.1,mlp_out.1,attn_out.1,resid_post.0", n_layers=2)
    assert [str(s) for s in sites] == ["resid_post.0", "attn_out.1", "mlp_out.1", "resid_post.1"]
    assert [str(s) for s in parse_sites("resid_post.*", 3)] == ["resid_post.0", "resid_post.1", "resid_post.2"]
    assert [str(s) for s in parse_sites(["mlp_out.0-2"], 4)] == ["mlp_out.0", "mlp_out.1", "mlp_out.2"]
    assert Site.parse("resid_post.7") == Site("resid_post", 7)


@pytest.mark.parametrize("spec, message", [
    ("resid_post.99", "layers 0-3"),
    ("resid_pre.1", "unknown site"),
    ("mlp_act.4", "layers 0-3"),
    ("resid_post", "unknown site"),
    ("resid_post.3-1", "empty layer range"),
    ("", "at least one site"),
])
def test_bad_sites_name_the_problem(spec, message):
    with pytest.raises(ScSteerError, match=message):
        parse_sites(spec, n_layers=4)


def test_star_needs_a_model():
    with pytest.raises(ScSteerError, match="needs a model"):
        parse_sites("resid_post.*")
