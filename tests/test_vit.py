"""vit_scratch.py: the model's contract and attention parity with the guide (CLI contract: test_training_cli.py)."""
import pytest
import torch

import vit_scratch
from guide_vit import GuideVisionTransformer, guide_state_dict
from vit_scratch import VisionTransformer

def test_default_model_is_the_guides_size_and_shape():
    model = VisionTransformer()
    assert sum(p.numel() for p in model.parameters()) == 3_195_146
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in GuideVisionTransformer().parameters())
    assert model.pos_embedding.shape == (1, 65, 256)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.forward_features(torch.randn(3, 3, 32, 32)).shape == (3, 65, 256)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fused_attention_equals_the_plain_math():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=64, hidden_dim=64, num_heads=8, num_layers=2, dropout=0.0).eval()
    x = torch.randn(4, 3, 32, 32)
    fused = model(x)
    for block in model.blocks:
        block.attn.fused = False
    torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_outputs_equal_the_guides_nn_multiheadattention_model():
    torch.manual_seed(0)
    ours, guide = VisionTransformer().eval(), GuideVisionTransformer().eval()
    guide.load_state_dict(guide_state_dict(ours.state_dict()))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), guide(x), atol=1e-5, rtol=1e-5)


def test_no_weight_decay_on_norms_biases_cls_and_positions():
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1)
    decay, no_decay = vit_scratch.make_optimizer(model, 1e-3, 0.05, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.cls_token) in no_decay_ids and id(model.pos_embedding) in no_decay_ids
    assert id(model.blocks[0].norm1.weight) in no_decay_ids and id(model.to_patch_embedding.bias) in no_decay_ids
    assert {id(p) for p in decay["params"]} == {id(model.to_patch_embedding.weight), id(model.blocks[0].attn.to_qkv.weight),
                                                id(model.blocks[0].attn.to_out.weight), id(model.blocks[0].mlp[0].weight),
                                                id(model.blocks[0].mlp[3].weight), id(model.mlp_head[1].weight)}


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [vit_scratch.lr_factor(s, 10, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)
