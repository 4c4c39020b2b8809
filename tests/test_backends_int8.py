"""The int8 recipes: which MatMuls stay fp32, recipe numbers in the cache key and the model identity,
and an identity from an older recipe reloading that recipe."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.errors import ConfigError
from engine.embed.backends import onnx_export
from engine.embed.encoders import encoder_from_identity, load_encoder
from tests.backend_utils import tiny_bert_with_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    yield from tiny_bert_with_cache(tmp_path_factory.mktemp("int8"))


def _ffn_graph(gelu: str):
    """x -> MatMul(up) -> GELU (one op, or the erf form torch exports) -> MatMul(down) -> MatMul(head)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "up_w"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "down_w"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "head_w"),
             numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "up_w"], ["h"], name="up")]
    if gelu == "op":
        nodes.append(helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"))
    else:
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
                  helper.make_node("Erf", ["d"], ["e"], name="erf"),
                  helper.make_node("Add", ["e", "one"], ["a"], name="add"),
                  helper.make_node("Mul", ["h", "a"], ["m"], name="mul"),
                  helper.make_node("Mul", ["m", "half"], ["g"], name="mul_half")]
    nodes += [helper.make_node("MatMul", ["g", "down_w"], ["y"], name="down"),
              helper.make_node("MatMul", ["y", "head_w"], ["z"], name="head")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 8])], inits)
    return helper.make_model(graph)


@pytest.mark.parametrize("gelu", ["op", "erf"])
def test_the_ffn_output_matmul_is_found_fused_or_not(gelu):
    model = _ffn_graph(gelu)
    assert onnx_export.fp32_nodes(model, ["ffn_output"]) == ["down"]
    assert onnx_export.fp32_nodes(model, []) == []


def test_recipes_are_part_of_the_key_and_unknown_ones_are_refused():
    keys = {onnx_export.export_key("w", "int8", r) for r in onnx_export.INT8_RECIPES}
    assert len(keys) == len(onnx_export.INT8_RECIPES)
    assert onnx_export.export_key("w", "int8") == onnx_export.export_key("w", "int8", onnx_export.INT8_RECIPE)
    assert onnx_export.export_key("w", "none", 1) == onnx_export.export_key("w", "none")  # fp32 has no recipe
    with pytest.raises(ConfigError, match="int8 recipe 99 is unknown"):
        onnx_export.export_key("w", "int8", 99)


def test_int8_keeps_the_ffn_output_in_fp32_and_an_old_identity_reloads_its_recipe(tiny):
    import onnx

    enc = load_encoder(str(tiny), device="cpu", backend="onnx", quantize="int8")
    ident = enc.identity
    assert ident["int8_recipe"] == onnx_export.INT8_RECIPE == 2
    graph = onnx.load(str(onnx_export.cache_root() / ident["export_fingerprint"] / "model.onnx")).graph
    names = {n.name for n in graph.node}
    kept = [n for n in names if n.endswith("output/dense/MatMul") and "attention" not in n]
    assert len(kept) == 2 and all(n in names for n in kept)  # two layers: their FFN outputs stay fp32 MatMuls
    assert any(n.endswith("intermediate/dense/MatMul_quant") for n in names)  # the rest is int8
    # The identity decides the recipe: as recorded, or 1 for identities from before recipes were recorded.
    assert encoder_from_identity(ident).identity["export_fingerprint"] == ident["export_fingerprint"]
    old = {k: v for k, v in ident.items() if k != "int8_recipe"}
    v1 = encoder_from_identity(old)
    assert v1.identity["int8_recipe"] == 1 and v1.identity["export_fingerprint"] != ident["export_fingerprint"]
    texts = ["boundary layer transition on a flat plate", "heat transfer in hypersonic flow"]
    fp32 = load_encoder(str(tiny), device="cpu", backend="onnx").encode(texts)
    for e in (enc, v1):
        assert (e.encode(texts) * fp32).sum(1).min() > 0.95
