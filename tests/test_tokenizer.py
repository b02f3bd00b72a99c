"""Captions are tokenised as the models train on them: truncated to the context, the end-of-text
token kept, nothing else lost."""
import pytest
import torch

from poisonbench.config import PROFILES
from test_files import CAPTIONS  # distinct captions with everything a caption file may hold


@pytest.mark.parametrize("model", sorted({p.model for p in PROFILES.values()}))
def test_tokenizer_truncates_long_captions_keeping_the_end_of_text_token(model):
    """The tokenizer the models train with (open_clip's, at the model's context length: 20 for the
    package's models, 77 for RN50): every caption starts with SOT and its last non-pad token is
    EOT, once; a caption longer than the context keeps its beginning; nothing else is lost."""
    import open_clip

    from poisonbench.models import register_model_configs

    register_model_configs()
    tok = open_clip.get_tokenizer(model)
    ctx = tok.context_length
    long_caption = " ".join(f"word{i}" for i in range(200))
    assert len(tok.encode(long_caption)) > 77
    tokens = tok(CAPTIONS + [long_caption])
    assert tokens.shape == (len(CAPTIONS) + 1, ctx) and tokens.dtype == torch.int64
    for caption, row in zip(CAPTIONS + [long_caption], tokens):
        used = row[row != 0]
        assert used[0] == tok.sot_token_id and used[-1] == tok.eot_token_id, repr(caption)
        assert (row == tok.eot_token_id).sum() == 1 and (row[len(used):] == 0).all(), repr(caption)
    assert tokens[-1, -1] == tok.eot_token_id  # truncated to the context, EOT in the last place
    assert tokens[-1, 1:-1].tolist() == tok.encode(long_caption)[: ctx - 2]
    assert tokens[CAPTIONS.index("")].tolist()[:3] == [tok.sot_token_id, tok.eot_token_id, 0]
    for text in ("emoji 👗👟 and accents café", "עברית مرحبا right to left"):
        assert tok.decode(tok.encode(text)).strip() == text  # emoji and right-to-left text are encoded, not lost
    if model == "poisonbench-tiny":  # the tokenizer the runner uses is this one
        from poisonbench.models import create_model

        assert torch.equal(create_model(model)[1](CAPTIONS + [long_caption]), tokens)
