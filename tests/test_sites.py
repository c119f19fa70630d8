"""Component names parse once, print back as written, and a bad name says how to write one."""

import pytest

from mechtests.core.sites import Head, LayerOut, Neuron, component, heads


@pytest.mark.parametrize("name, want", [
    ("9.9", Head(9, 9)), ("10.0", Head(10, 0)), ("attn3", LayerOut("attn", 3)),
    ("mlp_2", LayerOut("mlp", 2)), ("mlp9.1234", Neuron(9, 1234))])
def test_names_parse_to_typed_components(name, want):
    assert component(name) == want


@pytest.mark.parametrize("name", ["9.9", "attn3", "mlp9.1234"])
def test_str_gives_the_name_back(name):
    assert str(component(name)) == name


def test_heads_sort_by_layer_then_head():
    assert sorted(heads(["10.2", "9.9", "9.10"])) == [Head(9, 9), Head(9, 10), Head(10, 2)]


@pytest.mark.parametrize("name", ["9", "9.x", "head9.9", "", "attn"])
def test_a_bad_name_says_how_to_write_one(name):
    with pytest.raises(ValueError, match="name a head 'L.H'"):
        component(name)


def test_a_layer_is_not_a_head():
    with pytest.raises(ValueError, match="is not a head"):
        Head.parse("mlp9")
