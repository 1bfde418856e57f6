"""The study guide's ViT as written there (nn.MultiheadAttention, sequence-first), kept as the reference
that vit_scratch.py is measured and tested against: same parameters, same outputs, different speed."""

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py, wherever this is run from
from common import CIFAR_MEAN, CIFAR_STD, img_to_patch  # noqa: E402


def train_transform(padding=4):
    """The study guide's training pipeline for a PIL DataLoader."""
    from torchvision import transforms as T

    return T.Compose(
        [T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )


def test_transform():
    """The study guide's test pipeline."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


class AttentionBlock(nn.Module):
    def __init__(self, embed_dim, hidden_dim, num_heads, dropout=0.0):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.layer_norm_2 = nn.LayerNorm(embed_dim)
        self.linear = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, embed_dim), nn.Dropout(dropout))

    def forward(self, x):
        inp_x = self.layer_norm_1(x)
        x = x + self.attn(inp_x, inp_x, inp_x)[0]
        return x + self.linear(self.layer_norm_2(x))


class GuideVisionTransformer(nn.Module):
    def __init__(self, embed_dim=256, hidden_dim=512, num_channels=3, num_heads=8, num_layers=6, num_classes=10,
                 patch_size=4, num_patches=64, dropout=0.1):
        super().__init__()
        self.patch_size = patch_size
        self.input_layer = nn.Linear(num_channels * patch_size**2, embed_dim)
        self.transformer = nn.Sequential(
            *[AttentionBlock(embed_dim, hidden_dim, num_heads, dropout) for _ in range(num_layers)]
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.dropout = nn.Dropout(dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + num_patches, embed_dim))

    def forward(self, x):
        x = img_to_patch(x, self.patch_size)
        B, T, _ = x.shape
        x = self.input_layer(x)
        x = torch.cat([self.cls_token.repeat(B, 1, 1), x], dim=1)
        x = x + self.pos_embedding[:, : T + 1]
        x = self.dropout(x).transpose(0, 1)
        x = self.transformer(x)
        return self.mlp_head(x[0])


def guide_state_dict(vit_state):
    """Rename a vit_scratch.VisionTransformer state dict to the guide model's names (same tensors)."""
    renames = [("to_patch_embedding.", "input_layer."), ("blocks.", "transformer."), (".norm1.", ".layer_norm_1."),
               (".norm2.", ".layer_norm_2."), (".mlp.", ".linear."), (".attn.to_qkv.weight", ".attn.in_proj_weight"),
               (".attn.to_qkv.bias", ".attn.in_proj_bias"), (".attn.to_out.", ".attn.out_proj.")]
    out = {}
    for name, tensor in vit_state.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor
    return out


if __name__ == "__main__":
    sys.exit("guide_vit.py holds the study guide's model for bench_vit_step.py and the tests, and runs nothing "
             "itself: python benchmarks/bench_vit_step.py --help")
