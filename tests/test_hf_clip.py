"""A transformers CLIPModel folder loads behind polymodal's API and gives transformers' embeddings."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "in", "the", "top", "left", "two", "stars"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # eos has the highest id, as CLIP's
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # make every weight matter: no zero biases, LayerNorms off identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder, model, fast


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_hf_clip_embeddings_equal_transformers(clip_folder):
    from polymodal.models.clip import ContrastiveModel

    folder, hf, tokenizer = clip_folder
    model = ContrastiveModel.from_pretrained(folder)
    texts = ["a red circle", "two green stars in the top left"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text_ref = torch.nn.functional.normalize(_features(hf.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))), dim=-1)
        image_ref = torch.nn.functional.normalize(_features(hf.get_image_features(pixel_values=images)), dim=-1)
    assert torch.allclose(model.embed_text(texts), text_ref, atol=1e-5)
    assert torch.allclose(model.embed_image(images), image_ref, atol=1e-5)
    assert model.scale().item() == pytest.approx(hf.logit_scale.exp().item(), rel=1e-5)


def test_a_folder_that_is_not_clip_is_refused(tmp_path):
    from polymodal.errors import InputError
    from polymodal.models.hf_clip import read_hf_clip

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="not a Hugging Face CLIP folder"):
        read_hf_clip(tmp_path)
